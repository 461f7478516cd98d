"""Append-only, atomic record shards: how every long stage writes, so it can be killed and resumed.

A shard directory holds `part-00000.jsonl`, `part-00001.jsonl`, ... Each shard is written once, to a
temporary name, fsynced and renamed into place, and never touched again. A killed job loses at
most the records buffered since its last flush; rerunning it skips the ids already in shards, so
the final set has every id exactly once.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from potstill.errors import DataError
from potstill.fsutil import atomic_write_bytes, fsync_dir

SHARD_RE = re.compile(r"^part-(\d{5,})\.jsonl$")


def _shard_paths(directory: Path) -> list[Path]:
    found = [
        (int(m.group(1)), p)
        for p in directory.glob("part-*.jsonl")
        if (m := SHARD_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def read_shards(directory: str | Path) -> Iterator[dict]:
    """Records of every complete shard, in write order."""
    for path in _shard_paths(Path(directory)):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{lineno}: corrupt shard ({exc.msg}); shards are written "
                        "atomically, so it was edited by hand: restore or delete it"
                    ) from None


class ShardWriter:
    """Buffer records and write them as atomic shards.

    >>> with ShardWriter(out_dir) as writer:
    ...     for record in records:
    ...         if record["id"] not in writer.done_ids:
    ...             writer.write(process(record))

    A shard is flushed every `shard_size` records, or at a write once the oldest buffered record
    is `flush_seconds` old, whichever comes first (and on close).
    """

    def __init__(
        self, directory: str | Path, *, shard_size: int = 256, flush_seconds: float = 30.0
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        for stale in self.directory.glob(".part-*.tmp-*"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        paths = _shard_paths(self.directory)
        self._next_index = int(SHARD_RE.match(paths[-1].name).group(1)) + 1 if paths else 0
        self.done_ids: set[str] = {r["id"] for r in read_shards(self.directory)}
        self._buffer: list[dict] = []
        self._oldest = time.monotonic()
        self.written = 0

    def write(self, record: dict) -> None:
        record_id = record.get("id")
        if not isinstance(record_id, str):
            raise DataError(f"record without a string id cannot be written: {str(record)[:80]}")
        if record_id in self.done_ids:
            raise DataError(f"id '{record_id}' is already written in {self.directory}")
        self.done_ids.add(record_id)
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer.append(record)
        # Flush on size, or once the oldest buffered record has waited flush_seconds. Timing the
        # oldest record (not the last flush) keeps a burst of results (a finished batch) together
        # in one shard instead of flushing its first record alone and holding the rest back.
        if len(self._buffer) >= self.shard_size or (
            time.monotonic() - self._oldest >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        path = self.directory / f"part-{self._next_index:05d}.jsonl"
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._buffer)
        atomic_write_bytes(path, data.encode("utf-8"))
        # The buffer empties first: an interrupt (Ctrl-C, SIGTERM) before this line rewrites
        # the same shard on close, one after it finds nothing left to flush; none writes twice.
        flushed, self._buffer = self._buffer, []
        self._next_index += 1
        self.written += len(flushed)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        # Flush on errors too: everything buffered is complete, finished work.
        self.close()


def write_records(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records to one .jsonl or .parquet file, atomically."""
    path = Path(path)
    records = list(records)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(pa.Table.from_pylist(records), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    elif path.suffix in (".jsonl", ".ndjson"):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_bytes(path, data.encode("utf-8"))
    else:
        raise DataError(f"{path}: unsupported output type '{path.suffix}'; use .jsonl or .parquet")
    return path
