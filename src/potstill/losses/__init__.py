"""Distillation losses: pure divergences, hard/soft mixing with dynamic weights, one reduction rule,
sparse (top-k) teachers, and a fused chunked loss that never builds [N, V] logits.

    from potstill.losses import chunked_kd_loss, TeacherHidden
    out = chunked_kd_loss(student_hidden, student.lm_head.weight, labels,
                          TeacherHidden(teacher_hidden, teacher.lm_head.weight),
                          divergence="jsd", beta=0.5, temperature=2.0, alpha=0.5,
                          num_target_tokens=tokens_in_accumulation_window)
    out.loss.backward()

See docs/losses.md for every formula and its paper.
"""

from potstill.losses.chunked import (
    KDLoss,
    TeacherHidden,
    TeacherLogits,
    TeacherTopK,
    chunked_kd_loss,
    default_chunk_size,
    kd_loss,
)
from potstill.losses.divergences import (
    DIVERGENCES,
    forward_kl,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from potstill.losses.reduce import count_target_tokens, masked_sum, normalise, target_mask
from potstill.losses.sparse import sparse_divergence
from potstill.losses.weighting import STRATEGIES, Balance, Fixed, Schedule, TeacherConfidence, mix

__all__ = [
    "DIVERGENCES",
    "STRATEGIES",
    "Balance",
    "Fixed",
    "KDLoss",
    "Schedule",
    "TeacherConfidence",
    "TeacherHidden",
    "TeacherLogits",
    "TeacherTopK",
    "chunked_kd_loss",
    "count_target_tokens",
    "default_chunk_size",
    "forward_kl",
    "jsd",
    "kd_loss",
    "masked_sum",
    "mix",
    "normalise",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_divergence",
    "target_mask",
    "tvd",
]
