"""Work split by record id: `potstill generate --shard i/n`, `potstill eval --shard i/n`.

A record belongs to shard `sha256(id) mod n`: a pure function of its id, so the split does not
depend on record order, and adding records later moves none of the others. Shard i of n writes
its own run directory, `{output_dir}/shards/{i}-of-{n}/`, resumable like any run; `--merge` then
copies every shard's records into `{output_dir}` once all are complete. A key can only come from
the one shard its record hashes to, so the merge has no duplicates to resolve, and it names every
shard that still misses samples instead of writing a partial result.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from potstill.data.shards import ShardWriter, read_shards
from potstill.errors import ConfigError, DataError

SHARD_DIR = re.compile(r"^(\d+)-of-(\d+)$")


def shard_of(record_id: str, count: int) -> int:
    """The shard (0..count-1) a record id belongs to."""
    digest = hashlib.sha256(str(record_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    index: int
    """0-based: `--shard $RANK/$WORLD_SIZE` under a launcher."""
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def holds(self, record_id: str) -> bool:
        return shard_of(record_id, self.count) == self.index

    def select(self, records: Iterable[dict]) -> list[dict]:
        return [r for r in records if self.holds(str(r["id"]))]


def parse_shard(text: str) -> Shard:
    """'i/n' with 0 <= i < n, or a one-line ConfigError saying what is wrong."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"--shard: expected i/n (e.g. 0/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ConfigError(f"--shard {text}: the number of shards must be >= 1")
    if index >= count:
        raise ConfigError(
            f"--shard {text}: shards are numbered 0 to {count - 1}; the last is "
            f"--shard {count - 1}/{count}"
        )
    return Shard(index, count)


def shard_run_dir(output_dir: str | Path, shard: Shard) -> Path:
    return Path(output_dir) / "shards" / shard.name


def shard_dirs(output_dir: str | Path) -> tuple[int, dict[int, Path]]:
    """(n, {i: run directory}) of the shards written under `output_dir` (n = 0: none). Shards
    of two different splits (n) cannot be merged: refused."""
    root = Path(output_dir) / "shards"
    found: dict[int, dict[int, Path]] = {}
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if m := SHARD_DIR.match(path.name):
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
    if len(found) > 1:
        counts = ", ".join(str(n) for n in sorted(found))
        raise ConfigError(
            f"{root}: shards of several splits ({counts} shards); keep the directories of one "
            "split and delete the others"
        )
    return next(iter(found.items()), (0, {}))


def check_complete(
    output_dir: str | Path,
    count: int,
    expected: dict[int, set[str]],
    written: dict[int, set[str]],
    what: str,
) -> None:
    """Every shard of `count` holds exactly its expected keys; else one line naming what is
    missing (and how to finish it) or what does not belong."""
    for index in sorted(set(expected) | set(written)):
        shard = Shard(index, count)
        extra = sorted(written.get(index, set()) - expected.get(index, set()))
        if extra:
            raise DataError(
                f"{shard_run_dir(output_dir, shard)}: holds {len(extra)} {what} that are not "
                f"this shard's (first: '{extra[0]}'); the data or config changed since it ran: "
                "rerun that shard in a new output_dir"
            )
    missing = {i: sorted(keys - written.get(i, set())) for i, keys in expected.items()}
    missing = {i: keys for i, keys in missing.items() if keys}
    if missing:
        parts = "; ".join(
            f"shard {i}/{count} misses {len(keys)} (first: '{keys[0]}')"
            for i, keys in sorted(missing.items())
        )
        todo = " and ".join(f"--shard {i}/{count}" for i in sorted(missing))
        raise DataError(
            f"merge: {parts}; finish them with `{todo}` (reruns resume), then merge again"
        )


def written_ids(directory: Path) -> set[str]:
    return {r["id"] for r in read_shards(directory)} if directory.is_dir() else set()


def copy_records(sources: Iterable[Path], writer: ShardWriter, keep=lambda key: True) -> int:
    """Copy every record of the shard directories `sources` that `writer` lacks (and `keep`
    accepts) into it; returns how many were copied."""
    copied = 0
    for source in sources:
        if not source.is_dir():
            continue
        for record in read_shards(source):
            if record["id"] not in writer.done_ids and keep(record["id"]):
                writer.write(record)
                copied += 1
    return copied
