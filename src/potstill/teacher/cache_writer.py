"""`CacheWriter`: appends records to a teacher cache as atomic shards; resumable.

See `potstill.teacher.cache` for the layout and the reader, `cache_format` for the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from potstill.data.shard_buffer import BufferedShards
from potstill.errors import ConfigError, DataError
from potstill.fsutil import LockHeld, atomic_write_bytes, atomic_write_text, try_lock, unlock
from potstill.teacher.cache_format import (
    FORMAT,
    META,
    NO_SPAN,
    Q8_STEP,
    READ_VERSIONS,
    SHARDS,
    SPANS_UNIT,
    VERSION,
    Codec,
    check_finite,
    read_shard_header,
    shard_bytes,
    text_sha256,
)

VOLATILE_META = ("created",)
"""Metadata keys that may differ between the attempts of one cache."""
FIX_WRITE = "the teacher overflowed: run it with teacher.dtype=float32"


class CacheWriter(BufferedShards[tuple[str, int, bytes]]):
    """Append records to a cache directory as atomic shards; resumable.

    >>> with CacheWriter(path, meta) as writer:
    ...     for record_id, (ids, log_probs, log_tail) in rows:
    ...         if record_id not in writer.done_ids:
    ...             writer.write(record_id, ids, log_probs, log_tail)

    `meta` needs `vocab_size`, `k` and `encoding` (a name from `cache_format.ENCODINGS`); the rest
    (teacher, tokenizer fingerprint, temperature, ...) is stored as given. With
    `meta["spans"] = SPANS_UNIT` every `write` also takes the record's target text and each
    target token's character span in it. Reopening a directory with different metadata is
    refused. One writer per directory at a time (a file lock).
    """

    names = SHARDS
    already_written = "record '{id}' is already in the teacher cache {directory}"

    def __init__(
        self, path: str | Path, meta: dict, *, shard_size: int = 256, flush_seconds: float = 60.0
    ):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # Its own lock file, not the run directory's (`runs.RunDir`): the stage writes a cache
        # into the run directory it holds, and two locks of one file in one process exclude
        # each other. Both are taken without waiting, so they cannot deadlock.
        try:
            self._lock = try_lock(self.path / ".writer.lock")  # held until close()
        except LockHeld as held:
            raise ConfigError(
                f"{self.path}: another process is writing this cache (pid {held.pid}); wait for "
                "it or use another run.output_dir"
            ) from None
        try:
            self._open(meta)
            # After the metadata check, so a cache of another config is refused with its shards
            # and temp files untouched.
            super().__init__(self.path, shard_size=shard_size, flush_seconds=flush_seconds)
        except BaseException:
            self._unlock()
            raise
        self.tokens_written = 0
        # record id -> (spans, text sha256), kept beside the buffer until its shard has landed
        self._spans: dict[str, tuple[np.ndarray, str]] = {}

    def _open(self, meta: dict) -> None:
        temps = tuple(float(t) for t in meta.get("tail_temperatures") or ())
        codec = Codec(meta["encoding"], int(meta["vocab_size"]), int(meta["k"]), Q8_STEP, temps)
        self.with_spans = meta.get("spans") is not None
        if meta.get("spans") not in (None, SPANS_UNIT):
            raise ValueError(f"meta spans must be {SPANS_UNIT!r} or absent, got {meta['spans']!r}")
        full = {"format": FORMAT, "version": VERSION, **meta, "encoding": codec.describe()}
        self.meta = json.loads(json.dumps(full))  # as it reads back (tuples become lists)
        self.codec = codec
        self._check_or_write_meta()

    def _ids_in(self, paths: list[Path]) -> Iterator[str]:
        return (entry[0] for shard in paths for entry in read_shard_header(shard).index)

    def _unlock(self) -> None:
        unlock(self._lock)

    _release = _unlock  # close() unlocks after the last flush, even when that flush fails

    def _check_or_write_meta(self) -> None:
        meta_path = self.path / META
        if not meta_path.is_file():
            atomic_write_text(meta_path, json.dumps(self.meta, indent=2) + "\n")
            return
        before = json.loads(meta_path.read_text())
        if not self.with_spans and before.get("version") in READ_VERSIONS:
            # a cache without spans reads the same in every version: resume it as it is
            self.meta["version"] = before["version"]
        for key in sorted(set(before) | set(self.meta)):
            if key not in VOLATILE_META and before.get(key) != self.meta.get(key):
                raise ConfigError(
                    f"{self.path} holds a teacher cache with another {key} "
                    f"({before.get(key)!r} before, {self.meta.get(key)!r} now); use a new "
                    "output directory, or delete the old cache to start over"
                )

    def write(
        self, record_id: str, ids, log_probs, log_tail=None, tail_lse=None, *, spans=None,
        text=None,
    ) -> None:  # fmt: skip
        """One record: ids (T, k), log_probs (T, k) descending per row, log_tail (T,) the log of
        the teacher's mass outside the top k (needed by q8; implied by the others) and, when the
        meta has `tail_temperatures`, tail_lse (T, n): log Σ_tail p^(1/T_i) (`topk.tail_lse`). A
        cache with spans also needs `text` (the target text) and `spans` (T, 2): each target
        token's characters [start, end) in it, `NO_SPAN` for a token from outside it."""
        self._check_new(record_id)
        if self.with_spans:
            self._spans[record_id] = _checked_spans(record_id, spans, text, len(ids))
        ids, log_probs = _numpy(ids), _numpy(log_probs)
        if ids.ndim != 2 or ids.shape[0] == 0:
            raise ValueError(f"record '{record_id}': ids must be (T >= 1, k), got {ids.shape}")
        check_finite(log_probs, record_id, "teacher output", FIX_WRITE)
        if log_tail is None:
            log_tail = _implied_log_tail(log_probs)
        log_tail = _numpy(log_tail)
        check_finite(log_tail, record_id, "teacher output", FIX_WRITE)
        if tail_lse is not None:
            tail_lse = _numpy(tail_lse)
            check_finite(np.maximum(tail_lse, -1e30), record_id, "teacher output", FIX_WRITE)
        data = self.codec.encode(ids, log_probs, log_tail, tail_lse)
        self._add(record_id, (record_id, ids.shape[0], data))

    def _write_shard(self, path: Path, items: list[tuple[str, int, bytes]]) -> None:
        spans = [self._spans[record_id] for record_id, _, _ in items] if self.with_spans else None
        atomic_write_bytes(path, shard_bytes(items, {"encoding": self.meta["encoding"]}, spans))

    def _flushed(self, items: list[tuple[str, int, bytes]]) -> None:
        self.tokens_written += sum(tokens for _, tokens, _ in items)
        for record_id, _, _ in items:
            self._spans.pop(record_id, None)


def _checked_spans(record_id: str, spans, text, tokens: int) -> tuple[np.ndarray, str]:
    """(spans (T, 2) int32, sha256 of `text`); DataError naming the record when the spans do
    not fit the text (a bug in whoever computed them, caught before it is on disk)."""
    if not isinstance(text, str) or spans is None:
        raise DataError(f"record '{record_id}': this cache stores spans; pass spans= and text=")
    rows = np.asarray(spans, dtype=np.int64).reshape(-1, 2) if len(spans) else np.zeros((0, 2))
    outside = (rows == NO_SPAN).all(axis=1)
    inside = (0 <= rows[:, 0]) & (rows[:, 0] <= rows[:, 1]) & (rows[:, 1] <= len(text))
    if len(rows) != tokens or not (outside | inside).all():
        raise DataError(
            f"record '{record_id}': spans must be {tokens} (start, end) character ranges within "
            f"its {len(text)}-character text, or {NO_SPAN}"
        )
    return rows.astype("<i4"), text_sha256(text)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _implied_log_tail(log_probs: np.ndarray) -> np.ndarray:
    lp = log_probs.astype(np.float64)
    top = lp.max(axis=1, keepdims=True)
    mass = np.exp(top[:, 0]) * np.exp(lp - top).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.log(np.clip(1.0 - mass, 0.0, 1.0)).astype(np.float32)
