"""The bytes of an offline teacher cache: how one record's top-k rows are encoded, and shard files.

A record with T target tokens is one contiguous byte string:

    [log_tail: T float16]     only with q8 log-probs: log(1 − Σ p_topk), the teacher's tail mass
    [tail_lse: T·n float16]   version 2, a T = 1 cache with n `tail_temperatures` T_i: per token,
                              log Σ_tail p^(1/T_i), what re-tempering to T_i at read time needs
                              (`retemper`); row-major (T, n)
    [log-probs: T·k values]   f32 / f16 as they are, or q8: uint8 codes of (lp_top1 − lp) / step
    [ids: T·k ids]            u32 little-endian; packed: ceil(log2 V) bits each, LSB first; or
                              delta: each row sorted by id, gaps as LEB128 varints (the first id
                              absolute), log-probs stored in that same order

The first two parts have a fixed size for a given T; delta ids vary (1 to 3 bytes an id for
V < 2^21). Decoded rows are in the teacher's order (log-probs descending; delta rows are sorted
back, ties by id). q8 decodes to r = −code·step, renormalised so that the k probabilities sum to
exactly 1 − tail: the tail bucket the sparse loss needs is the teacher's own, not a rounding
leftover. Codes saturate at 255 (255·step nats below the top-1).

A shard is a safetensors file holding one uint8 tensor `data` (the records, back to back), and in
its metadata the index (record id → offset, length, tokens, crc32 of its bytes) and the sha256 of
`data`. It is written
to a temporary name, fsynced and renamed, so a shard is whole or absent; readers memory-map it.

Version 2 adds optional spans (a cache written with `spans=true`), apart from the records' bytes
so the row codecs above are untouched: an int32 tensor `spans` (rows, 2), every record's rows
back to back in index order, row i the characters [start, end) of the target text that the
record's i-th target token covers ((-1, -1): a token from outside the text, the end-of-turn);
and in the metadata `text_sha256` (one per index entry: the sha256 of the record's target text)
and `spans_sha256` (of the `spans` tensor's bytes). Version 1 shards (no spans) still read.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from potstill.data.shard_buffer import ShardNames
from potstill.errors import DataError
from potstill.teacher.cache_ids import decode_ids, encode_ids, varint_width

FORMAT = "potstill-teacher-cache"
VERSION = 2
READ_VERSIONS = (1, 2)
"""Versions this potstill reads: 1 has neither tail temperatures nor spans (its records are as
2's); 2 may have either or both."""
SPANS_UNIT = "characters"
"""meta.json's `spans` of a cache with spans: offsets count characters of the target text."""
NO_SPAN = (-1, -1)
"""The span of a target token that is not from the target text (the end-of-turn)."""
ID_CODECS = ("delta", "packed", "u32")
LOG_PROB_CODECS = ("q8", "f16", "f32")
ENCODINGS = tuple(f"{i}-{lp}" for i in ID_CODECS for lp in LOG_PROB_CODECS)
Q8_STEP = 1 / 16
"""Nats per q8 code: a probability is off by at most step/2 = 3.1% of itself; 255 codes span 15.9
nats (p/p_top1 down to 1.2e-7). On the real pair q8 gave f32's KL and gradient cosine to 4
digits (benchmarks/kd_cache.py, docs/teacher_cache.md)."""
_LP_BYTES = {"q8": 1, "f16": 2, "f32": 4}
_LP_DTYPES = {"f16": "<f2", "f32": "<f4"}


SHARDS = ShardNames("shard", ".safetensors")
SHARD_RE = SHARDS.pattern
META = "meta.json"
FIX_READ = "delete this shard and rerun `potstill teacher cache` to recompute its records"


def text_sha256(text: str) -> str:
    """The hash a cache with spans keeps of a record's target text (utf-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shard_paths(directory: Path) -> list[Path]:
    """A cache directory's complete shards, in write order."""
    return SHARDS.paths(directory)


def check_finite(log_probs: np.ndarray, record_id: str, where: Path | str, fix: str) -> None:
    """DataError naming the record and token when log-probs hold NaN or +inf."""
    # -inf is a probability of 0, which the losses accept; NaN and +inf are not.
    bad = np.isnan(log_probs) | (log_probs == np.inf)
    if bad.any():
        token = int(np.argwhere(bad)[0][0])
        raise DataError(
            f"{where}: record '{record_id}' holds NaN/+inf teacher log-probs (target token "
            f"{token}); {fix}"
        )


@dataclass(frozen=True)
class Codec:
    """Encodes and decodes one record's (T, k) top-k rows."""

    encoding: str
    vocab_size: int
    k: int
    q8_step: float = Q8_STEP
    tail_temperatures: tuple[float, ...] = ()
    """Temperatures the tail's log-sum-exp is stored at, so a T = 1 cache reads at them too."""

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding}")
        if any(not t > 0 for t in self.tail_temperatures):
            raise ValueError(f"tail temperatures must be > 0, got {self.tail_temperatures}")
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
            "id_bits": self.id_bits if self.ids != "delta" else None,
            "log_probs": self.log_probs,
            "q8_step": self.q8_step if self.log_probs == "q8" else None,
            "tail": "stored (float16 log)" if self.log_probs == "q8" else "implied",
            "tail_temperatures": list(self.tail_temperatures),
        }

    @classmethod
    def from_meta(cls, meta: dict) -> Codec:
        enc = meta["encoding"]
        temps = tuple(float(t) for t in enc.get("tail_temperatures") or ())  # absent in version 1
        step = enc["q8_step"] or Q8_STEP
        return cls(enc["name"], int(meta["vocab_size"]), int(meta["k"]), step, temps)

    def _fixed(self, tokens: int) -> tuple[int, int]:
        """Bytes of the tail (mass and log-sum-exps) and log-prob parts, which depend on T alone."""
        tail = 2 * tokens if self.log_probs == "q8" else 0
        tail += 2 * tokens * len(self.tail_temperatures)
        return tail, tokens * self.k * _LP_BYTES[self.log_probs]

    def id_bytes_range(self, tokens: int) -> tuple[int, int]:
        """Smallest and largest size of a record's ids part."""
        n = tokens * self.k
        if self.ids == "delta":
            return n, n * varint_width(self.vocab_size - 1)
        size = (n * self.id_bits + 7) // 8 if self.ids == "packed" else 4 * n
        return size, size

    def fits(self, tokens: int, length: int) -> bool:
        """Whether a record of `tokens` tokens can be `length` bytes long."""
        low, high = self.id_bytes_range(tokens)
        return low <= length - sum(self._fixed(tokens)) <= high

    def encode(self, ids, log_probs, log_tail, tail_lse=None) -> bytes:
        """(T, k) ids, (T, k) log-probs (descending per row), (T,) log tail mass and, with tail
        temperatures, (T, n) log Σ_tail p^(1/T_i) -> bytes."""
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
            rel = (log_probs.max(axis=1, keepdims=True) - log_probs) / self.q8_step
            codes = np.clip(np.rint(np.nan_to_num(rel, posinf=255.0)), 0, 255).astype(np.uint8)
        else:
            codes = log_probs.astype(_LP_DTYPES[self.log_probs])
        if self.tail_temperatures:
            shape = (tokens, len(self.tail_temperatures))
            if tail_lse is None or np.shape(tail_lse) != shape:
                raise ValueError(f"tail_lse must be {shape}, one per tail temperature")
            # Above 0 at T > 1 (Σ p^(1/T) > Σ p); an empty tail (-inf) saturates at float16's
            # -65504: finite, and as empty as -inf once exponentiated.
            lse = np.clip(np.asarray(tail_lse, dtype=np.float32), -65504.0, 65504.0)
            parts.append(lse.astype("<f2").tobytes())
        if self.ids == "delta":  # rows in id order, log-probs alongside
            order = np.argsort(ids, axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=1)
            codes = np.take_along_axis(codes, order, axis=1)
        parts.append(codes.tobytes())
        parts.append(encode_ids(ids, self.ids, self.id_bits))
        return b"".join(parts)

    def decode(self, buf: np.ndarray, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """bytes (uint8 array, one record) -> ids int64 (T, k), log-probs float32 (T, k).
        Raises ValueError when the ids part does not hold T·k ids."""
        n_tail, n_lp = self._fixed(tokens)
        shape = (tokens, self.k)
        lp_buf = buf[n_tail : n_tail + n_lp]
        if self.log_probs == "q8":
            log_tail = buf[: 2 * tokens].view("<f2").astype(np.float32)
            r = lp_buf.astype(np.float32).reshape(shape) * -self.q8_step
            top = np.log1p(-np.exp(log_tail))  # log Σ p_topk = log(1 − tail)
            r_max = r.max(axis=1, keepdims=True)
            lse = r_max[:, 0] + np.log(np.exp(r - r_max).sum(axis=1))
            log_probs = r + (top - lse)[:, None]
        else:
            log_probs = lp_buf.view(_LP_DTYPES[self.log_probs]).astype(np.float32).reshape(shape)
        ids = decode_ids(buf[n_tail + n_lp :], self.ids, self.id_bits, tokens * self.k)
        ids = ids.reshape(shape)
        if self.ids == "delta":
            ids = np.cumsum(ids, axis=1)
            order = np.argsort(-log_probs, axis=1, kind="stable")  # back to descending
            ids = np.take_along_axis(ids, order, axis=1)
            log_probs = np.take_along_axis(log_probs, order, axis=1)
        return ids, log_probs

    def decode_tail_lse(self, buf: np.ndarray, tokens: int) -> np.ndarray:
        """(T, n) float32 log Σ_tail p^(1/T_i), one column per tail temperature."""
        start = 2 * tokens if self.log_probs == "q8" else 0
        n = len(self.tail_temperatures)
        part = buf[start : start + 2 * tokens * n]
        return part.view("<f2").astype(np.float32).reshape(tokens, n)


def retemper(log_probs: np.ndarray, tail_lse: np.ndarray, temperature: float):
    """T = 1 top-k log-probs (..., k) and the tail's log Σ p^(1/T) (...,) -> the top k's log-probs
    at temperature T (..., k) and the tail's log mass at T (...,).

    p_T ∝ p^(1/T): over the kept ids exactly, and the tail's softened mass is its stored
    log-sum-exp, so the k + 1 outcomes are those of the dense softened distribution."""
    scaled = np.asarray(log_probs, dtype=np.float64) / temperature
    top = scaled.max(axis=-1, keepdims=True)
    top_lse = top[..., 0] + np.log(np.exp(scaled - top).sum(axis=-1))
    log_z = np.logaddexp(top_lse, np.asarray(tail_lse, dtype=np.float64))
    return (scaled - log_z[..., None]).astype(np.float32), (tail_lse - log_z).astype(np.float32)


def shard_bytes(
    records: list[tuple[str, int, bytes]],
    extra: dict,
    spans: list[tuple[np.ndarray, str]] | None = None,
) -> bytes:
    """A shard file's bytes from (record id, tokens, encoded bytes) triples and, for a cache with
    spans, one (spans (T, 2) int32, sha256 of the target text) per record, in the same order."""
    from safetensors.numpy import save

    index, offset = [], 0
    for record_id, tokens, data in records:
        index.append([record_id, offset, len(data), tokens, zlib.crc32(data)])
        offset += len(data)
    data = np.frombuffer(b"".join(d for _, _, d in records), dtype=np.uint8)
    metadata = {
        "format": f"{FORMAT}/{VERSION}",
        "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        "index": json.dumps(index, ensure_ascii=False),
        **{key: json.dumps(value) for key, value in extra.items()},
    }
    tensors = {"data": data}
    if spans is not None:
        rows = [np.asarray(s, dtype="<i4").reshape(-1, 2) for s, _ in spans]
        if [len(r) for r in rows] != [tokens for _, tokens, _ in records]:
            raise ValueError("spans must have one row per target token of each record")
        tensors["spans"] = np.concatenate(rows) if rows else np.zeros((0, 2), dtype="<i4")
        metadata["text_sha256"] = json.dumps([sha for _, sha in spans])
        metadata["spans_sha256"] = hashlib.sha256(tensors["spans"].tobytes()).hexdigest()
    return canonical_header(save(tensors, metadata=metadata))


def canonical_header(raw: bytes) -> bytes:
    """`raw` safetensors bytes with the header's keys sorted: safetensors keeps the metadata in a
    Rust HashMap, whose order changes from one process to the next, so the same records made two
    different files. Sorted, a shard's bytes depend on its records alone (a rerun, or the Ray
    engine, writes the same file). The data offsets are relative to the end of the header, so
    they hold as they are; the header stays padded with spaces to a multiple of 8 bytes."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {**({"__metadata__": dict(sorted(meta.items()))} if meta else {})}
    ordered.update(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


@dataclass
class ShardInfo:
    path: Path
    data_start: int
    """Byte offset of the records inside the file."""
    data_bytes: int
    sha256: str
    index: list
    """[record id, offset, length, tokens, crc32] per record."""
    spans_start: int | None = None
    """Byte offset of the `spans` tensor (int32 (rows, 2)) inside the file; None: no spans."""
    text_sha256: list | None = None
    """sha256 of each record's target text, in index order (with spans)."""
    spans_sha256: str | None = None


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
        readable = [f"{FORMAT}/{v}" for v in READ_VERSIONS]
        if meta["format"] not in readable:
            raise DataError(
                f"{path}: shard format {meta['format']!r}, expected one of {', '.join(readable)}"
            )
        index = json.loads(meta["index"])
        sha = meta["sha256"]
        spans = _spans_header(header, index)
        tensors_end = max(header[name]["data_offsets"][1] for name in ("data", *spans[:1]))
    except (ValueError, LookupError, TypeError) as exc:
        raise DataError(f"{path}: corrupt shard header ({exc}); {fix}") from None
    expected = 8 + n + tensors_end
    if size != expected:
        what = "truncated" if size < expected else "oversized"
        raise DataError(f"{path}: {what} shard ({size} bytes, header says {expected}); {fix}")
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 5):
            raise DataError(f"{path}: corrupt index entry {str(entry)[:60]}; {fix}")
        rid, offset, length, tokens, _ = entry
        if offset < 0 or offset + length > end - start or tokens < 1:
            raise DataError(f"{path}: corrupt index entry for record '{rid}'; {fix}")
    info = ShardInfo(path, 8 + n + start, end - start, sha, index)
    if spans:
        info.spans_start = 8 + n + header["spans"]["data_offsets"][0]
        info.text_sha256, info.spans_sha256 = spans[1], spans[2]
    return info


def _spans_header(header: dict, index: list) -> tuple:
    """("spans", text sha256 list, spans sha256) of a shard with spans, () without; ValueError
    when its parts do not fit the index (one row per token, one text hash per record)."""
    if "spans" not in header:
        return ()
    tensor, meta = header["spans"], header["__metadata__"]
    rows = sum(int(entry[3]) for entry in index)
    begin, stop = tensor["data_offsets"]
    if tensor["dtype"] != "I32" or tensor["shape"] != [rows, 2] or stop - begin != 8 * rows:
        raise ValueError(f"spans {tensor['dtype']} {tensor['shape']} for {rows} rows")
    hashes = json.loads(meta["text_sha256"])
    if not isinstance(hashes, list) or len(hashes) != len(index):
        raise ValueError("text_sha256 must hold one hash per record")
    return ("spans", hashes, meta["spans_sha256"])


def _sha256_of(path: Path, start: int, size: int, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = size
        while left:
            block = f.read(min(chunk, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def check_shard_sha256(info: ShardInfo) -> None:
    spans_bytes = 8 * sum(int(entry[3]) for entry in info.index)
    if info.spans_start is not None and (
        _sha256_of(info.path, info.spans_start, spans_bytes) != info.spans_sha256
    ):
        raise DataError(
            f"{info.path}: corrupt shard (sha256 of its spans differs from the one written); "
            "delete it and rerun `potstill teacher cache` with the same config to recompute it"
        )
    if _sha256_of(info.path, info.data_start, info.data_bytes) != info.sha256:
        raise DataError(
            f"{info.path}: corrupt shard (sha256 of its records differs from the one written); "
            "delete it and rerun `potstill teacher cache` with the same config to recompute it"
        )
