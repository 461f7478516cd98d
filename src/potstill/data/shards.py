"""Append-only, atomic record shards: how every long stage writes, so it can be killed and resumed.

A shard directory holds `part-00000.jsonl`, `part-00001.jsonl`, ... Each shard is written once, to a
temporary name, fsynced and renamed into place, and never touched again. A killed job loses at
most the records buffered since its last flush; rerunning it skips the ids already in shards, so
the final set has every id exactly once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from potstill.data.records import escaped, lone_surrogates
from potstill.data.shard_buffer import BufferedShards, ShardNames
from potstill.errors import DataError
from potstill.fsutil import atomic_write_bytes, fsync_dir

NAMES = ShardNames("part", ".jsonl")
SHARD_RE = NAMES.pattern


def _read(paths: list[Path]) -> Iterator[dict]:
    for path in paths:
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


def read_shards(directory: str | Path) -> Iterator[dict]:
    """Records of every complete shard, in write order."""
    yield from _read(NAMES.paths(Path(directory)))


def _json_line(record: dict, destination: Path) -> bytes:
    """The record as one UTF-8 JSON line; DataError naming the record and field if it can't be."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        _refuse_surrogates(record, destination)
        raise  # not a surrogate after all: a bug, with its own traceback


def _refuse_surrogates(record: dict, destination: Path) -> None:
    if problems := lone_surrogates(record):
        record_id = escaped(str(record.get("id")))
        raise DataError(
            f"record '{record_id}' cannot be written to {destination}: {problems[0]}, which no "
            "UTF-8 file can store; fix that field where the record comes from, or drop the record"
        )


class ShardWriter(BufferedShards[bytes]):
    """Buffer records and write them as atomic shards.

    >>> with ShardWriter(out_dir) as writer:
    ...     for record in records:
    ...         if record["id"] not in writer.done_ids:
    ...             writer.write(process(record))

    A shard is flushed every `shard_size` records, or at a write once the oldest buffered record
    is `flush_seconds` old, whichever comes first (and on close). A record is encoded when it is
    written, so one that cannot be stored (a lone surrogate) is refused alone, up front.
    """

    names = NAMES

    def __init__(
        self, directory: str | Path, *, shard_size: int = 256, flush_seconds: float = 30.0
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        super().__init__(self.directory, shard_size=shard_size, flush_seconds=flush_seconds)

    def _ids_in(self, paths: list[Path]) -> Iterator[str]:
        return (record["id"] for record in _read(paths))

    def write(self, record: dict) -> None:
        record_id = record.get("id")
        if not isinstance(record_id, str):
            raise DataError(f"record without a string id cannot be written: {str(record)[:80]}")
        self._check_new(record_id)
        self._add(record_id, _json_line(record, self.directory))

    def _write_shard(self, path: Path, items: list[bytes]) -> None:
        atomic_write_bytes(path, b"".join(items))


def write_records(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records to one .jsonl or .parquet file, atomically."""
    path = Path(path)
    records = list(records)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for record in records:  # Arrow strings are UTF-8 too
            _refuse_surrogates(record, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(pa.Table.from_pylist(records), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    elif path.suffix in (".jsonl", ".ndjson"):
        atomic_write_bytes(path, b"".join(_json_line(r, path) for r in records))
    else:
        raise DataError(f"{path}: unsupported output type '{path.suffix}'; use .jsonl or .parquet")
    return path
