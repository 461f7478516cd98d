"""The bytes of an offline teacher cache: how one record's top-k rows are encoded, and shard files.

A record with T target tokens is one contiguous byte string (T, k fixed, so its length follows):

    [log_tail: T float16]     only with q8 log-probs: log(1 − Σ p_topk), the teacher's tail mass
    [log-probs: T·k values]   f32 / f16 as they are, or q8: uint8 codes of (lp_top1 − lp) / step
    [ids: T·k ids]            u32 little-endian, or packed: ceil(log2 V) bits each, LSB first

Rows keep the teacher's order (log-probs descending). q8 decodes to r = −code·step, renormalised
so that the k probabilities sum to exactly 1 − tail: the tail bucket the sparse loss needs is the
teacher's own, not a rounding leftover. Codes saturate at 255 (255·step nats below the top-1).

A shard is a safetensors file holding one uint8 tensor `data` (the records, back to back), and in
its metadata the index (record id → offset, length, tokens) and the sha256 of `data`. It is written
to a temporary name, fsynced and renamed, so a shard is whole or absent; readers memory-map it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from potstill.errors import DataError

FORMAT = "potstill-teacher-cache"
VERSION = 1
ID_CODECS = ("packed", "u32")
LOG_PROB_CODECS = ("q8", "f16", "f32")
ENCODINGS = tuple(f"{i}-{lp}" for i in ID_CODECS for lp in LOG_PROB_CODECS)
Q8_STEP = 1 / 16
"""Nats per q8 code: a probability is off by at most step/2 = 3.1% of itself; 255 codes span 15.9
nats (p/p_top1 down to 1.2e-7). Chosen by measurement (benchmarks/kd_cache.py, docs)."""
_LP_BYTES = {"q8": 1, "f16": 2, "f32": 4}
_LP_DTYPES = {"f16": "<f2", "f32": "<f4"}


@dataclass(frozen=True)
class Codec:
    """Encodes and decodes one record's (T, k) top-k rows."""

    encoding: str
    vocab_size: int
    k: int
    q8_step: float = Q8_STEP

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding}")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"k must be in [1, {self.vocab_size}], got {self.k}")

    @property
    def ids(self) -> str:
        return self.encoding.split("-")[0]

    @property
    def log_probs(self) -> str:
        return self.encoding.split("-")[1]

    @property
    def id_bits(self) -> int:
        return max(1, (self.vocab_size - 1).bit_length()) if self.ids == "packed" else 32

    def describe(self) -> dict:
        """The encoding as stored in the cache's metadata (and read back by `from_meta`)."""
        return {
            "name": self.encoding,
            "ids": self.ids,
            "id_bits": self.id_bits,
            "log_probs": self.log_probs,
            "q8_step": self.q8_step if self.log_probs == "q8" else None,
            "tail": "stored (float16 log)" if self.log_probs == "q8" else "implied",
        }

    @classmethod
    def from_meta(cls, meta: dict) -> Codec:
        enc = meta["encoding"]
        return cls(enc["name"], int(meta["vocab_size"]), int(meta["k"]), enc["q8_step"] or Q8_STEP)

    def _parts(self, tokens: int) -> tuple[int, int, int]:
        n = tokens * self.k
        tail = 2 * tokens if self.log_probs == "q8" else 0
        ids = (n * self.id_bits + 7) // 8 if self.ids == "packed" else 4 * n
        return tail, n * _LP_BYTES[self.log_probs], ids

    def nbytes(self, tokens: int) -> int:
        return sum(self._parts(tokens))

    def encode(self, ids: np.ndarray, log_probs: np.ndarray, log_tail: np.ndarray) -> bytes:
        """(T, k) ids, (T, k) log-probs (descending per row), (T,) log tail mass -> bytes."""
        ids = np.asarray(ids, dtype=np.int64)
        log_probs = np.asarray(log_probs, dtype=np.float32)
        tokens = ids.shape[0]
        if ids.shape != (tokens, self.k) or log_probs.shape != ids.shape:
            raise ValueError(
                f"ids {ids.shape} and log-probs {log_probs.shape} must both be (T, k={self.k})"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size})")
        parts = []
        if self.log_probs == "q8":
            # log_tail <= -1.2e-7: a tail that rounds to 1 in float16 would leave no mass for the
            # top k; NaN passes through so the reader can name the record.
            tail = np.minimum(np.asarray(log_tail, dtype=np.float32).reshape(tokens), -1.2e-7)
            parts.append(tail.astype("<f2").tobytes())
            rel = (log_probs[:, :1] - log_probs) / self.q8_step
            parts.append(
                np.clip(np.rint(np.nan_to_num(rel, posinf=255.0)), 0, 255).astype(np.uint8)
            )
        else:
            parts.append(log_probs.astype(_LP_DTYPES[self.log_probs]).tobytes())
        flat = ids.reshape(-1).astype("<u4")
        if self.ids == "packed":
            bits = np.unpackbits(flat.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
            parts.append(np.packbits(bits[:, : self.id_bits].reshape(-1), bitorder="little"))
        else:
            parts.append(flat)
        return b"".join(p if isinstance(p, bytes) else p.tobytes() for p in parts)

    def decode(self, buf: np.ndarray, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """bytes (uint8 array of `nbytes(tokens)`) -> ids int64 (T, k), log-probs float32 (T, k)."""
        n_tail, n_lp, n_ids = self._parts(tokens)
        shape = (tokens, self.k)
        lp_buf = buf[n_tail : n_tail + n_lp]
        if self.log_probs == "q8":
            log_tail = buf[:n_tail].view("<f2").astype(np.float32)
            r = lp_buf.astype(np.float32).reshape(shape) * -self.q8_step
            top = np.log1p(-np.exp(log_tail))  # log Σ p_topk = log(1 − tail)
            r_max = r.max(axis=1, keepdims=True)
            lse = r_max[:, 0] + np.log(np.exp(r - r_max).sum(axis=1))
            log_probs = r + (top - lse)[:, None]
        else:
            log_probs = lp_buf.view(_LP_DTYPES[self.log_probs]).astype(np.float32).reshape(shape)
        id_buf = buf[n_tail + n_lp : n_tail + n_lp + n_ids]
        if self.ids == "packed":
            n = tokens * self.k
            bits = np.unpackbits(id_buf, count=n * self.id_bits, bitorder="little")
            wide = np.zeros((n, 32), dtype=np.uint8)
            wide[:, : self.id_bits] = bits.reshape(n, self.id_bits)
            ids = np.packbits(wide, axis=1, bitorder="little").view("<u4")
        else:
            ids = id_buf.view("<u4")
        return ids.reshape(shape).astype(np.int64), log_probs


def shard_bytes(records: list[tuple[str, int, bytes]], extra: dict) -> bytes:
    """A shard file's bytes from (record id, tokens, encoded bytes) triples."""
    from safetensors.numpy import save

    index, offset = [], 0
    for record_id, tokens, data in records:
        index.append([record_id, offset, len(data), tokens])
        offset += len(data)
    data = np.frombuffer(b"".join(d for _, _, d in records), dtype=np.uint8)
    metadata = {
        "format": f"{FORMAT}/{VERSION}",
        "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        "index": json.dumps(index, ensure_ascii=False),
        **{key: json.dumps(value) for key, value in extra.items()},
    }
    return save({"data": data}, metadata=metadata)


@dataclass
class ShardInfo:
    path: Path
    data_start: int
    """Byte offset of the records inside the file."""
    data_bytes: int
    sha256: str
    index: list
    """[record id, offset, length, tokens] per record."""


def read_shard_header(path: Path) -> ShardInfo:
    """Parse and size-check a shard's safetensors header (reads no record bytes)."""
    size = path.stat().st_size
    fix = "delete it and rerun `potstill teacher cache` with the same config to recompute it"
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise DataError(f"{path}: truncated shard ({size} bytes, no whole header); {fix}")
            header = json.loads(f.read(n))
        meta = header["__metadata__"]
        start, end = header["data"]["data_offsets"]
        if meta["format"] != f"{FORMAT}/{VERSION}":
            raise DataError(f"{path}: shard format {meta['format']!r}, expected {FORMAT}/{VERSION}")
        index = json.loads(meta["index"])
        sha = meta["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: corrupt shard header ({exc}); {fix}") from None
    expected = 8 + n + end
    if size != expected:
        what = "truncated" if size < expected else "oversized"
        raise DataError(f"{path}: {what} shard ({size} bytes, header says {expected}); {fix}")
    for entry in index:
        rid, offset, length, tokens = entry
        if offset < 0 or offset + length > end - start or tokens < 1:
            raise DataError(f"{path}: corrupt index entry for record '{rid}'; {fix}")
    return ShardInfo(path, 8 + n + start, end - start, sha, index)


def check_shard_sha256(info: ShardInfo, chunk: int = 1 << 24) -> None:
    h = hashlib.sha256()
    with open(info.path, "rb") as f:
        f.seek(info.data_start)
        left = info.data_bytes
        while left:
            block = f.read(min(chunk, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    if h.hexdigest() != info.sha256:
        raise DataError(
            f"{info.path}: corrupt shard (sha256 of its records differs from the one written); "
            "delete it and rerun `potstill teacher cache` with the same config to recompute it"
        )
