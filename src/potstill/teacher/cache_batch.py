"""The teacher-cache computation of one batch, where the teacher runs: in `potstill teacher cache`'s
own process (`LocalTeacher`) or in Ray actors (`teacher.ray_cache.RayTeacher`, engine: ray).
Both run the same batches through `cache_batch`, so both caches hold the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from potstill.config.sections import ModelConfig
from potstill.data.examples import Example, collate
from potstill.losses.chunked import default_chunk_size
from potstill.teacher.topk import tail_lse, target_hidden, target_logits, top_k_rows

Tensor = torch.Tensor


@dataclass(frozen=True)
class CacheSpec:
    """What a cached row holds: the top k at `temperature`, and the tail's log-sum-exps at each
    of `tail_temperatures` (none: no column)."""

    k: int
    temperature: float
    tail_temperatures: tuple[float, ...]
    pad_id: int


@dataclass
class BatchRows:
    """A batch's cached rows, concatenated over its records (record i has `rows[i]`): top-k ids
    (N, k), log-probs (N, k), log tail mass (N,), tail log-sum-exps (N, len(tails)) or None."""

    ids: Tensor
    log_probs: Tensor
    log_tail: Tensor
    lse: Tensor | None
    rows: list[int]


def cache_batch(model, examples: Sequence[Example], spec: CacheSpec) -> BatchRows:
    """The teacher's rows of one batch of examples (right-padded, one forward pass); only the
    hidden states that predict a target token go through the lm_head, a chunk at a time."""
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = default_chunk_size(vocab, budget_bytes=1 << 28)
    with torch.inference_mode():
        hidden, rows = target_hidden(model, collate(list(examples), spec.pad_id))
        outs = [
            _rows(target_logits(model, hidden[i : i + chunk]), spec)
            for i in range(0, hidden.shape[0], chunk)
        ]
    ids, log_probs, log_tail, lse = (
        torch.cat(x).cpu() if x[0] is not None else None for x in zip(*outs, strict=True)
    )
    return BatchRows(ids, log_probs, log_tail, lse, rows)


def _rows(logits: Tensor, spec: CacheSpec):
    """(n, V) logits -> top-k ids, log-probs, log tail mass and the tail's log-sum-exps at the
    tail temperatures (None without)."""
    ids, log_probs, log_tail = top_k_rows(logits, spec.k, spec.temperature)
    tails = spec.tail_temperatures
    lse = tail_lse(logits, ids, tails) if tails else None
    return ids, log_probs, log_tail, lse


class LocalTeacher:
    """The teacher loaded in this process; `run` computes the batches in order."""

    def __init__(self, teacher: ModelConfig, spec: CacheSpec):
        from potstill.models import load_model

        self.spec = spec
        self.failed: list = []  # nothing fails quietly here: an error ends the stage
        self.model = load_model(
            teacher.name,
            dtype=teacher.dtype,
            device=teacher.device,
            trust_remote_code=teacher.trust_remote_code,
        ).eval()

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def run(
        self, batches: Sequence[Sequence[tuple[str, Example]]]
    ) -> Iterator[tuple[int, BatchRows]]:
        """(index, rows) of each batch of (record id, example), in order."""
        for index, batch in enumerate(batches):
            yield index, cache_batch(self.model, [example for _, example in batch], self.spec)

    def close(self) -> None:
        self.model = None
