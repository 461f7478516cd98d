"""The offline teacher cache: the teacher's top-k log-probs at every target token, memory-mapped.

    cache = open_cache("runs/teacher-cache", tokenizer=student_tokenizer,
                       teacher="qwen2.5-coder-1.5b-instruct", vocab_size=student_vocab)
    top = cache.get(record["id"])      # TeacherTopK: ids (T, k), log_probs (T, k)
    chunked_kd_loss(hidden, weight, labels, top, temperature=cache.meta["temperature"])

Rows follow a record's target tokens in order: the positions t ≥ 1 with labels[t] != -100 in
`build_example(tokenizer, prompt_messages, target, meta["max_seq_len"])`; row i is the teacher's
distribution over that token (computed at position t − 1), at the cache's temperature.

A cache made with `spans=true` also holds, per row, the characters of the record's target text
that the row's target token covers, and the sha256 of that text (`spans`, `text_sha256`): what
a student with another tokenizer needs to align its own tokens with the teacher's.

A cache directory holds `meta.json` (teacher, tokenizer fingerprint, vocabulary, k, temperature,
encoding, data fields) and `shard-NNNNN.safetensors` files (see `cache_format`). `CacheWriter`
(`cache_writer`, re-exported here) appends shards atomically, so a killed job loses at most its
buffered records and a rerun skips every record already cached; no record is written twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from potstill.errors import ConfigError, DataError
from potstill.losses.chunked import TeacherTopK
from potstill.teacher.cache_format import (
    FIX_READ,
    FORMAT,
    META,
    READ_VERSIONS,
    SPANS_UNIT,
    Codec,
    ShardInfo,
    check_finite,
    check_shard_sha256,
    read_shard_header,
    retemper,
    shard_paths,
)
from potstill.teacher.cache_writer import CacheWriter

__all__ = ["CacheWriter", "TeacherCache", "open_cache", "tokenizer_fingerprint"]


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
        self.has_spans = meta.get("spans") == SPANS_UNIT
        self._span_rows: dict[str, tuple[int, str]] = {}  # id -> (first row in spans, sha256)
        for s, info in enumerate(shards):
            if self.has_spans and info.spans_start is None:
                raise DataError(
                    f"{info.path}: the cache stores spans ({META}) but this shard has none; "
                    f"{FIX_READ}"
                )
            row = 0
            for number, (record_id, offset, length, tokens, crc) in enumerate(info.index):
                if self.has_spans:
                    self._span_rows[record_id] = (row, info.text_sha256[number])
                row += tokens
                if record_id in self._where:
                    other = shards[self._where[record_id][0]].path.name
                    raise DataError(
                        f"{info.path}: record '{record_id}' is also in {other}; the cache was "
                        "written by two jobs at once: delete one of the two shards"
                    )
                if not self.codec.fits(tokens, length):
                    raise DataError(
                        f"{info.path}: record '{record_id}' has {length} bytes, too many or too "
                        f"few for {tokens} tokens; {FIX_READ}"
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

    def temperatures(self) -> list[float]:
        """The temperatures `get` reads at: the cache's own, and its tail temperatures."""
        return [float(self.meta["temperature"]), *self.codec.tail_temperatures]

    def decode(self, record_id: str, temperature: float | None = None):
        """ids int64 (T, k), log-probs float32 (T, k) as numpy arrays, checked; at `temperature`
        (None: the cache's), re-tempered from T = 1 when it is one of the tail temperatures."""
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
            raise DataError(f"{where}: record '{record_id}' is corrupt (crc32); {FIX_READ}")
        try:
            ids, log_probs = self.codec.decode(buf, tokens)
        except ValueError as exc:
            raise DataError(
                f"{where}: record '{record_id}' is corrupt ({exc}); {FIX_READ}"
            ) from None
        if ids.size and (ids.min() < 0 or ids.max() >= self.codec.vocab_size):
            raise DataError(
                f"{where}: record '{record_id}' holds ids outside [0, {self.codec.vocab_size}); "
                f"{FIX_READ}"
            )
        check_finite(log_probs, record_id, where, FIX_READ)
        if temperature is None or float(temperature) == float(self.meta["temperature"]):
            return ids, log_probs
        if temperature not in self.codec.tail_temperatures or self.meta["temperature"] != 1:
            raise ConfigError(
                f"{self.path}: the cache reads at temperatures {self.temperatures()}, not "
                f"{temperature}; distil at one of them or cache again at temperature 1 with "
                f"tail_temperatures=[{temperature}]"
            )
        column = self.codec.tail_temperatures.index(temperature)
        lse = self.codec.decode_tail_lse(buf, tokens)[:, column]
        return ids, retemper(log_probs, lse, float(temperature))[0]

    def spans(self, record_id: str) -> np.ndarray:
        """(T, 2) int64: row i's target token covers characters [start, end) of the record's
        target text; (-1, -1) for a token from outside it. Only in a cache with spans."""
        s, _, _, tokens, _ = self._where[record_id]
        row, _ = self._span_rows[record_id]
        info = self._shards[s]
        with open(info.path, "rb") as f:
            f.seek(info.spans_start + 8 * row)
            buf = f.read(8 * tokens)
        if len(buf) != 8 * tokens:
            raise DataError(f"{info.path}: record '{record_id}' has truncated spans; {FIX_READ}")
        return np.frombuffer(buf, dtype="<i4").reshape(tokens, 2).astype(np.int64)

    def text_sha256(self, record_id: str) -> str:
        """sha256 of the target text the record was cached from. Only in a cache with spans."""
        return self._span_rows[record_id][1]

    def get(self, record_id: str, temperature: float | None = None) -> TeacherTopK:
        """The record's top-k teacher rows: ids LongTensor (T, k), log_probs FloatTensor (T, k),
        at `temperature` (None: the cache's; see `decode`)."""
        ids, log_probs = self.decode(record_id, temperature)
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
    if meta.get("format") != FORMAT or meta.get("version") not in READ_VERSIONS:
        raise DataError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
            f"potstill reads {FORMAT} versions {', '.join(map(str, READ_VERSIONS))}: rebuild "
            "the cache"
        )
    if teacher is not None and not _same_model(meta["teacher"], str(teacher)):
        raise ConfigError(
            f"{path}: cache made with teacher '{meta['teacher']}', not '{teacher}'; distil from "
            f"'{meta['teacher']}' or rebuild the cache with teacher.name={teacher}"
        )
    if vocab_size is not None and int(vocab_size) != int(meta["vocab_size"]):
        raise DataError(
            f"{path}: cache holds a vocabulary of {meta['vocab_size']:,} ids, the student has "
            f"{int(vocab_size):,}; use a student of the teacher's family (one vocabulary), or "
            "distil across vocabularies: loss.cross_tokenizer and a cache made with spans=true"
        )
    if tokenizer is not None:
        found = tokenizer_fingerprint(tokenizer)
        if found != meta["tokenizer_fingerprint"]:
            raise DataError(
                f"{path}: cache made with another tokenizer (fingerprint "
                f"{meta['tokenizer_fingerprint'][:12]}, this one {found[:12]}): its token ids "
                "would not line up; use the teacher's tokenizer family or rebuild the cache"
            )
    shards = [read_shard_header(p) for p in shard_paths(path)]
    cache = TeacherCache(path, meta, shards)
    if verify:
        cache.verify()
    return cache
