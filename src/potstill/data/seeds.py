"""Sampling seeds that depend only on what identifies a sample, never on batching or order."""

from __future__ import annotations

import hashlib


def sample_seed(base_seed: int, record_id: str, sample: int) -> int:
    """A per-sample seed that depends on nothing but (base seed, record id, sample index)."""
    digest = hashlib.sha256(f"{base_seed}\0{record_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


ROLLOUT_MIX = 1_000_003
"""Spreads (seed, micro-batch, row) over distinct generator seeds."""


def rollout_seed(seed: int, micro_batch: int, row: int) -> int:
    """The seed of row `row` of training micro-batch `micro_batch` (on-policy samples, GRPO
    groups): a function of the micro-batch's global index, so a resumed run, or the same
    micro-batch on another process, samples the same."""
    return ((seed * ROLLOUT_MIX + micro_batch) * 1024 + row + 1) % (1 << 63)
