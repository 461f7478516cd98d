"""Distillation losses: pure divergences, hard/soft mixing with dynamic weights, one reduction rule,
sparse (top-k) teachers, and a fused chunked loss that never builds [N, V] logits.

    from potstill.losses import chunked_kd_loss, TeacherHidden
    out = chunked_kd_loss(student_hidden, student.lm_head.weight, labels,
                          TeacherHidden(teacher_hidden, teacher.lm_head.weight),
                          divergence="jsd", beta=0.5, temperature=2.0, alpha=0.5,
                          num_target_tokens=tokens_in_accumulation_window)
    out.loss.backward()

Divergences live in one registry (`potstill.losses.registry`): `divergence_names()`,
`get_divergence(name)`, `check_divergence(name, params)`, and `register(Divergence(...))` to add
one (docs/losses.md, "Adding a divergence"). See docs/losses.md for every formula and its paper.
"""

from potstill.losses.chunked import chunk_rows, chunked_kd_loss, default_chunk_size
from potstill.losses.divergences import (
    forward_kl,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from potstill.losses.plain import KDLoss, TeacherHidden, TeacherLogits, TeacherTopK, kd_loss
from potstill.losses.reduce import count_target_tokens, masked_sum, normalise, target_mask
from potstill.losses.registry import (
    DIVERGENCES,
    Divergence,
    Param,
    check_divergence,
    divergence_names,
    get_divergence,
    register,
    unregister,
)
from potstill.losses.sparse import sparse_divergence
from potstill.losses.weighting import STRATEGIES, Balance, Fixed, Schedule, TeacherConfidence, mix

__all__ = [
    "DIVERGENCES",
    "STRATEGIES",
    "Balance",
    "Divergence",
    "Fixed",
    "KDLoss",
    "Param",
    "Schedule",
    "TeacherConfidence",
    "TeacherHidden",
    "TeacherLogits",
    "TeacherTopK",
    "check_divergence",
    "chunk_rows",
    "chunked_kd_loss",
    "count_target_tokens",
    "default_chunk_size",
    "divergence_names",
    "forward_kl",
    "get_divergence",
    "jsd",
    "kd_loss",
    "masked_sum",
    "mix",
    "normalise",
    "register",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_divergence",
    "target_mask",
    "tvd",
    "unregister",
]
