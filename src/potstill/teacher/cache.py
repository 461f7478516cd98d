"""The offline teacher cache: the teacher's top-k log-probs at every target token, memory-mapped.

    cache = open_cache("runs/teacher-cache", tokenizer=student_tokenizer,
                       teacher="qwen2.5-coder-1.5b-instruct", vocab_size=student_vocab)
    top = cache.get(record["id"])      # TeacherTopK: ids (T, k), log_probs (T, k)
    chunked_kd_loss(hidden, weight, labels, top, temperature=cache.meta["temperature"])

Rows follow a record's target tokens in order: the positions t ≥ 1 with labels[t] != -100 in
`build_example(tokenizer, prompt_messages, target, meta["max_seq_len"])`; row i is the teacher's
distribution over that token (computed at position t − 1), at the cache's temperature.

A cache directory holds `meta.json` (teacher, tokenizer fingerprint, vocabulary, k, temperature,
encoding, data fields) and `shard-NNNNN.safetensors` files (see `cache_format`). `CacheWriter`
appends shards atomically, so a killed job loses at most its buffered records and a rerun skips
every record already cached; no record is ever written twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from potstill.errors import ConfigError, DataError
from potstill.fsutil import atomic_write_bytes, atomic_write_text
from potstill.losses.chunked import TeacherTopK
from potstill.teacher.cache_format import (
    FORMAT,
    VERSION,
    Codec,
    ShardInfo,
    check_shard_sha256,
    read_shard_header,
    shard_bytes,
)

SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
META = "meta.json"
VOLATILE_META = ("created",)
"""Metadata keys that may differ between the attempts of one cache."""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a record's token ids: the vocabulary, the added/special tokens and
    the chat template — as it renders the conversations the trainers build (system + user, user
    alone), not its source text: Qwen2.5-Coder 0.5B and 1.5B ship templates that differ only in
    the escaping of a tool-call branch, and must match. (The pad token is left out:
    `load_tokenizer` sets it when a model has none, and it never appears in a record.)"""
    added = sorted(
        (int(i), t.content, bool(t.special)) for i, t in tokenizer.added_tokens_decoder.items()
    )
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "added": added,
        "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token],
        "chat_template": _rendered_template(tokenizer),
    }
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_PROBES = (
    ({"role": "system", "content": "S y s"}, {"role": "user", "content": "U s e r"}),
    ({"role": "user", "content": "U s e r"},),
)


def _rendered_template(tokenizer) -> list[str] | None:
    if not getattr(tokenizer, "chat_template", None):
        return None  # render_prompt's plain-text fallback: decided by the tokens above
    rendered = []
    for messages in _PROBES:
        try:
            rendered.append(
                tokenizer.apply_chat_template(
                    list(messages), tokenize=False, add_generation_prompt=True
                )
            )
        except Exception as exc:  # e.g. a template that refuses a system turn
            rendered.append(f"error: {type(exc).__name__}")
    return rendered


def _shard_paths(directory: Path) -> list[Path]:
    found = [
        (int(m.group(1)), p)
        for p in directory.glob("shard-*.safetensors")
        if (m := SHARD_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def _check_finite(log_probs: np.ndarray, record_id: str, where: Path | str, fix: str) -> None:
    # -inf is a probability of 0, which the losses accept; NaN and +inf are not.
    bad = np.isnan(log_probs) | (log_probs == np.inf)
    if bad.any():
        token = int(np.argwhere(bad)[0][0])
        raise DataError(
            f"{where}: record '{record_id}' holds NaN/+inf teacher log-probs (target token "
            f"{token}); {fix}"
        )


_FIX_WRITE = "the teacher overflowed: run it with teacher.dtype=float32"
_FIX_READ = "delete this shard and rerun `potstill teacher cache` to recompute its records"


class CacheWriter:
    """Append records to a cache directory as atomic shards; resumable.

    >>> with CacheWriter(path, meta) as writer:
    ...     for record_id, (ids, log_probs, log_tail) in rows:
    ...         if record_id not in writer.done_ids:
    ...             writer.write(record_id, ids, log_probs, log_tail)

    `meta` needs `vocab_size`, `k` and `encoding` (a name from `cache_format.ENCODINGS`); the rest
    (teacher, tokenizer fingerprint, temperature, ...) is stored as given. Reopening a directory
    with different metadata is refused. One writer per directory at a time (a file lock).
    """

    def __init__(
        self, path: str | Path, meta: dict, *, shard_size: int = 256, flush_seconds: float = 60.0
    ):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / ".writer.lock", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ConfigError(
                f"{self.path}: another process is writing this cache; wait for it or use "
                "another run.output_dir"
            ) from None
        try:
            self._open(meta)
        except BaseException:
            self._unlock()
            raise
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        self._buffer: list[tuple[str, int, bytes]] = []
        self._oldest = time.monotonic()
        self.written = 0
        self.tokens_written = 0

    def _open(self, meta: dict) -> None:
        codec = Codec(meta["encoding"], int(meta["vocab_size"]), int(meta["k"]))
        full = {"format": FORMAT, "version": VERSION, **meta, "encoding": codec.describe()}
        self.meta = json.loads(json.dumps(full))  # as it reads back (tuples become lists)
        self.codec = codec
        self._check_or_write_meta()
        for stale in self.path.glob(".shard-*.tmp-*"):  # left by a killed writer
            stale.unlink(missing_ok=True)
        paths = _shard_paths(self.path)
        self._next = int(SHARD_RE.match(paths[-1].name).group(1)) + 1 if paths else 0
        self.done_ids: set[str] = set()
        for shard in paths:
            self.done_ids.update(entry[0] for entry in read_shard_header(shard).index)

    def _unlock(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()

    def _check_or_write_meta(self) -> None:
        meta_path = self.path / META
        if not meta_path.is_file():
            atomic_write_text(meta_path, json.dumps(self.meta, indent=2) + "\n")
            return
        before = json.loads(meta_path.read_text())
        for key in sorted(set(before) | set(self.meta)):
            if key not in VOLATILE_META and before.get(key) != self.meta.get(key):
                raise ConfigError(
                    f"{self.path} holds a teacher cache with another {key} "
                    f"({before.get(key)!r} before, {self.meta.get(key)!r} now); use a new "
                    "output directory, or delete the old cache to start over"
                )

    def write(self, record_id: str, ids, log_probs, log_tail=None) -> None:
        """One record: ids (T, k), log_probs (T, k) descending per row, log_tail (T,) the log of
        the teacher's mass outside the top k (needed by q8; implied by the others)."""
        if record_id in self.done_ids:
            raise DataError(f"record '{record_id}' is already in the teacher cache {self.path}")
        ids, log_probs = _numpy(ids), _numpy(log_probs)
        if ids.ndim != 2 or ids.shape[0] == 0:
            raise ValueError(f"record '{record_id}': ids must be (T >= 1, k), got {ids.shape}")
        _check_finite(log_probs, record_id, "teacher output", _FIX_WRITE)
        if log_tail is None:
            log_tail = _implied_log_tail(log_probs)
        log_tail = _numpy(log_tail)
        _check_finite(log_tail, record_id, "teacher output", _FIX_WRITE)
        data = self.codec.encode(ids, log_probs, log_tail)
        self.done_ids.add(record_id)
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer.append((record_id, ids.shape[0], data))
        if len(self._buffer) >= self.shard_size or (
            time.monotonic() - self._oldest >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        shard = self.path / f"shard-{self._next:05d}.safetensors"
        atomic_write_bytes(shard, shard_bytes(self._buffer, {"encoding": self.meta["encoding"]}))
        self._next += 1
        self.written += len(self._buffer)
        self.tokens_written += sum(tokens for _, tokens, _ in self._buffer)
        self._buffer = []

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._unlock()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *_) -> None:
        # Flush on errors too: every buffered record is complete.
        self.close()


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _implied_log_tail(log_probs: np.ndarray) -> np.ndarray:
    lp = log_probs.astype(np.float64)
    top = lp.max(axis=1, keepdims=True)
    mass = np.exp(top[:, 0]) * np.exp(lp - top).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.log(np.clip(1.0 - mass, 0.0, 1.0)).astype(np.float32)


class TeacherCache:
    """A cache directory opened for reading: records are decoded on `get` from memory-mapped
    shards. Safe to hand to DataLoader workers (maps are reopened in each process)."""

    max_open_shards = 64

    def __init__(self, path: Path, meta: dict, shards: list[ShardInfo]):
        self.path = path
        self.meta = meta
        self.codec = Codec.from_meta(meta)
        self._shards = shards
        self._where: dict[str, tuple[int, int, int, int, int]] = {}
        for s, info in enumerate(shards):
            for record_id, offset, length, tokens, crc in info.index:
                if record_id in self._where:
                    other = shards[self._where[record_id][0]].path.name
                    raise DataError(
                        f"{info.path}: record '{record_id}' is also in {other}; the cache was "
                        "written by two jobs at once: delete one of the two shards"
                    )
                if not self.codec.fits(tokens, length):
                    raise DataError(
                        f"{info.path}: record '{record_id}' has {length} bytes, too many or too "
                        f"few for {tokens} tokens; {_FIX_READ}"
                    )
                self._where[record_id] = (s, offset, length, tokens, crc)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._where

    def ids(self) -> list[str]:
        """Cached record ids, in write order."""
        return list(self._where)

    def num_tokens(self, record_id: str) -> int:
        return self._where[record_id][3]

    @property
    def tokens(self) -> int:
        """Target tokens over all records."""
        return sum(w[3] for w in self._where.values())

    @property
    def nbytes(self) -> int:
        """Bytes on disk: shard files (headers and indexes included) and meta.json."""
        files = [s.path for s in self._shards] + [self.path / META]
        return sum(f.stat().st_size for f in files)

    def _map(self, s: int) -> np.memmap:
        if s in self._maps:
            self._maps.move_to_end(s)
            return self._maps[s]
        info = self._shards[s]
        mm = np.memmap(info.path, dtype=np.uint8, mode="r", offset=info.data_start)
        self._maps[s] = mm
        while len(self._maps) > self.max_open_shards:  # bound open file descriptors
            self._maps.popitem(last=False)
        return mm

    def decode(self, record_id: str) -> tuple[np.ndarray, np.ndarray]:
        """ids int64 (T, k), log-probs float32 (T, k) as numpy arrays, checked."""
        try:
            s, offset, length, tokens, crc = self._where[record_id]
        except KeyError:
            raise KeyError(
                f"record '{record_id}' is not in the teacher cache {self.path} "
                f"({len(self)} records); rerun `potstill teacher cache` on this data"
            ) from None
        buf = np.array(self._map(s)[offset : offset + length])  # copy: aligned, map-independent
        where = self._shards[s].path
        if zlib.crc32(buf) != crc:
            raise DataError(f"{where}: record '{record_id}' is corrupt (crc32); {_FIX_READ}")
        try:
            ids, log_probs = self.codec.decode(buf, tokens)
        except ValueError as exc:
            raise DataError(
                f"{where}: record '{record_id}' is corrupt ({exc}); {_FIX_READ}"
            ) from None
        if ids.size and (ids.min() < 0 or ids.max() >= self.codec.vocab_size):
            raise DataError(
                f"{where}: record '{record_id}' holds ids outside [0, {self.codec.vocab_size}); "
                f"{_FIX_READ}"
            )
        _check_finite(log_probs, record_id, where, _FIX_READ)
        return ids, log_probs

    def get(self, record_id: str) -> TeacherTopK:
        """The record's top-k teacher rows: ids LongTensor (T, k), log_probs FloatTensor (T, k)."""
        ids, log_probs = self.decode(record_id)
        return TeacherTopK(torch.from_numpy(ids), torch.from_numpy(log_probs))

    def verify(self) -> None:
        """Read everything: each shard's sha256, each record's log-probs finite."""
        for s, info in enumerate(self._shards):
            check_shard_sha256(info)
            for record_id, *_ in info.index:
                if self._where[record_id][0] == s:
                    self.decode(record_id)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()  # memory maps are per process, never copied
        return state


def _same_model(cached: str, given: str) -> bool:
    if cached == given:
        return True
    a, b = Path(cached).expanduser(), Path(given).expanduser()
    return a.is_dir() and b.is_dir() and os.path.samefile(a, b)


def open_cache(
    path,
    *,
    tokenizer=None,
    teacher: str | None = None,
    vocab_size: int | None = None,
    verify: bool = True,
) -> TeacherCache:
    """Open a cache directory, checked up front against what the caller will train with.

    Raises DataError/ConfigError (one line: what, where, how to fix) when the cache was made with
    another tokenizer or teacher, for another vocabulary size, or when a shard is truncated or
    corrupt. `verify` (default) also reads every byte: shard checksums and NaN/+inf log-probs;
    without it those are checked per record on `get`.
    """
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise DataError(
            f"{path}: not a teacher cache (no {META}); make one with `potstill teacher cache`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path}: corrupt ({exc.msg}); rebuild the cache") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
            f"potstill reads {FORMAT} version {VERSION}: rebuild the cache"
        )
    if teacher is not None and not _same_model(meta["teacher"], str(teacher)):
        raise ConfigError(
            f"{path}: cache made with teacher '{meta['teacher']}', not '{teacher}'; distil from "
            f"'{meta['teacher']}' or rebuild the cache with teacher.name={teacher}"
        )
    if vocab_size is not None and int(vocab_size) != int(meta["vocab_size"]):
        raise DataError(
            f"{path}: cache holds a vocabulary of {meta['vocab_size']:,} ids, the student has "
            f"{int(vocab_size):,}; use a student of the teacher's family (one vocabulary)"
        )
    if tokenizer is not None:
        found = tokenizer_fingerprint(tokenizer)
        if found != meta["tokenizer_fingerprint"]:
            raise DataError(
                f"{path}: cache made with another tokenizer (fingerprint "
                f"{meta['tokenizer_fingerprint'][:12]}, this one {found[:12]}): its token ids "
                "would not line up; use the teacher's tokenizer family or rebuild the cache"
            )
    shards = [read_shard_header(p) for p in _shard_paths(path)]
    cache = TeacherCache(path, meta, shards)
    if verify:
        cache.verify()
    return cache
