"""The one buffered, append-only, atomic shard-writing core behind every shard writer.

`ShardWriter` (record shards, `part-NNNNN.jsonl`) and the teacher cache's `CacheWriter`
(`shard-NNNNN.safetensors`) differ only in the bytes of a shard and in how ids are read back
from one. Everything else lives here once: shard names and the next index, stale temp files, the
done ids, the buffer and when it flushes, the order that makes an interrupted flush safe, close
and the context manager. A format subclasses `BufferedShards` and supplies `_write_shard` (put
these items at this path atomically) and `_ids_in` (the ids the complete shards hold).
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Self, TypeVar

from potstill.errors import DataError

T = TypeVar("T")


@dataclass(frozen=True)
class ShardNames:
    """How a shard directory names its files: `{prefix}-00000{suffix}`, `{prefix}-00001...`."""

    prefix: str
    suffix: str
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        escaped = re.escape(self.prefix), re.escape(self.suffix)
        pattern = re.compile(rf"^{escaped[0]}-(\d{{5,}}){escaped[1]}$")
        object.__setattr__(self, "pattern", pattern)

    def path(self, directory: Path, index: int) -> Path:
        return directory / f"{self.prefix}-{index:05d}{self.suffix}"

    def paths(self, directory: Path) -> list[Path]:
        """The complete shards of `directory`, in write order (by number, not by name)."""
        found = [
            (int(m.group(1)), p)
            for p in Path(directory).glob(f"{self.prefix}-*{self.suffix}")
            if (m := self.pattern.match(p.name))
        ]
        return [p for _, p in sorted(found)]

    def next_index(self, paths: list[Path]) -> int:
        return int(self.pattern.match(paths[-1].name).group(1)) + 1 if paths else 0

    def remove_stale(self, directory: Path) -> None:
        """Delete the temp files a killed writer left (`fsutil.atomic_write_bytes` names them
        `.NAME.tmp-PID`); no reader ever looks at them."""
        for stale in Path(directory).glob(f".{self.prefix}-*.tmp-*"):
            stale.unlink(missing_ok=True)


class BufferedShards(ABC, Generic[T]):
    """Buffer items and write them as numbered shards, each once, atomically; resumable.

    A shard is flushed every `shard_size` items, or at an add once the oldest buffered item is
    `flush_seconds` old, whichever comes first (and on close, errors included: every buffered
    item is complete work). Reopening a directory continues after its last shard, with
    `done_ids` holding every id already on disk.
    """

    names: ShardNames
    """The file names of this format's shards."""
    already_written: str = "id '{id}' is already written in {directory}"
    """The DataError for an id written twice; `{id}` and `{directory}` are filled in."""

    def __init__(self, directory: Path, *, shard_size: int, flush_seconds: float):
        self._shard_dir = Path(directory)
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        self.names.remove_stale(self._shard_dir)
        paths = self.names.paths(self._shard_dir)
        self._next_index = self.names.next_index(paths)
        self.done_ids: set[str] = set(self._ids_in(paths))
        self._buffer: list[T] = []
        self._oldest = time.monotonic()
        self.written = 0

    @abstractmethod
    def _ids_in(self, paths: list[Path]) -> Iterable[str]:
        """The ids the complete shards `paths` hold."""

    @abstractmethod
    def _write_shard(self, path: Path, items: list[T]) -> None:
        """Write `items` as the shard `path`, atomically: whole or absent, never torn. It may be
        called again for the same path with the same items (and maybe more) after an
        interrupt; the second file replaces the first."""

    def _flushed(self, items: list[T]) -> None:
        """Per-format bookkeeping once `items` are on disk (a counter, say)."""

    def _release(self) -> None:
        """What close() frees after the last flush (a lock, say), even when that flush fails."""

    def _check_new(self, item_id: str) -> None:
        """Refuse an id already written or buffered; call before the item's costly checks."""
        if item_id in self.done_ids:
            raise DataError(self.already_written.format(id=item_id, directory=self._shard_dir))

    def _add(self, item_id: str, item: T) -> None:
        """Buffer one item, already checked and encoded, and flush if it is time."""
        self.done_ids.add(item_id)
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer.append(item)
        # Flush on size, or once the oldest buffered item has waited flush_seconds. Timing the
        # oldest item (not the last flush) keeps a burst of results (a finished batch) together
        # in one shard instead of flushing its first item alone and holding the rest back.
        if len(self._buffer) >= self.shard_size or (
            time.monotonic() - self._oldest >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        items = self._buffer
        if not items:
            return
        self._write_shard(self.names.path(self._shard_dir, self._next_index), items)
        # The shard has landed. An interrupt (Ctrl-C, or SIGTERM as KeyboardInterrupt) before
        # the next statement leaves the buffer and the index as they were, so close() rewrites
        # the same shard with the same items (the rename replaces it): nothing twice. The buffer
        # and the index then change in one statement of plain stores, which no interrupt can
        # split (Python raises a signal's exception only at a call or a loop's jump), so a close
        # after it finds nothing left to flush, and no later flush reuses this shard's name.
        written = self.written + len(items)
        self._buffer, self._next_index, self.written = [], self._next_index + 1, written
        self._flushed(items)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_) -> None:
        # Flush on errors too: everything buffered is complete, finished work.
        self.close()
