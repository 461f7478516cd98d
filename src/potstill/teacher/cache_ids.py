"""The teacher cache's id encodings (docs/teacher_cache.md): `u32` (4 bytes an id), `packed`
(the fewest bits that hold the vocabulary) and `delta` (each row's ids sorted ascending, the
first absolute, then the gaps as LEB128 varints)."""

from __future__ import annotations

import numpy as np


def varint_width(value: int) -> int:
    return max(1, (int(value).bit_length() + 6) // 7)


def encode_ids(ids: np.ndarray, codec: str, bits: int) -> bytes:
    """(T, k) int64 ids -> bytes. delta expects each row sorted ascending."""
    if codec == "u32":
        return ids.reshape(-1).astype("<u4").tobytes()
    if codec == "packed":
        flat = ids.reshape(-1).astype("<u4")
        planes = np.unpackbits(flat.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        return np.packbits(planes[:, :bits].reshape(-1), bitorder="little").tobytes()
    gaps = np.diff(ids, axis=1, prepend=0).reshape(-1)  # first id absolute, then gaps >= 1
    width = np.ones_like(gaps)
    for shift in (7, 14, 21, 28):
        width += gaps >= (1 << shift)
    starts = np.cumsum(width) - width
    out = np.empty(int(width.sum()), dtype=np.uint8)
    for j in range(int(width.max(initial=1))):
        has = width > j
        more = (width[has] - 1 > j).astype(np.int64) << 7  # LEB128: high bit = more bytes follow
        out[starts[has] + j] = ((gaps[has] >> (7 * j)) & 0x7F) | more
    return out.tobytes()


def decode_ids(buf: np.ndarray, codec: str, bits: int, n: int) -> np.ndarray:
    """bytes -> n int64 ids (delta: the gaps, to be summed per row)."""
    if codec == "u32":
        if buf.size != 4 * n:
            raise ValueError(f"{buf.size} id bytes for {n} ids")
        return buf.view("<u4").astype(np.int64)
    if codec == "packed":
        if buf.size != (n * bits + 7) // 8:
            raise ValueError(f"{buf.size} id bytes for {n} ids of {bits} bits")
        planes = np.zeros((n, 32), dtype=np.uint8)
        planes[:, :bits] = np.unpackbits(buf, count=n * bits, bitorder="little").reshape(n, bits)
        return np.packbits(planes, axis=1, bitorder="little").view("<u4")[:, 0].astype(np.int64)
    last = (buf & 0x80) == 0  # the last byte of each varint
    if int(last.sum()) != n or (buf.size and not last[-1]):
        raise ValueError(f"the id varints hold {int(last.sum())} ids, not {n}")
    group = np.concatenate([[0], np.cumsum(last[:-1])])  # which varint each byte belongs to
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    shift = 7 * (np.arange(buf.size) - starts[group])
    return np.add.reduceat((buf & 0x7F).astype(np.int64) << shift, starts)
