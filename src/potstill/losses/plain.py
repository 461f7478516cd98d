"""The plain distillation loss from student logits, and the per-token pieces the chunked loss
shares with it: the teacher kinds, one chunk's CE / soft divergence / kd_ratio, and the argument
checks both run.

The teacher is one of `TeacherLogits` (dense logits), `TeacherHidden` (hidden states + lm_head:
online distillation) or `TeacherTopK` (an offline cache). The divergence is any row of
`potstill.losses.registry`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from potstill.losses.divergences import check_pair, check_temperature, upcast
from potstill.losses.reduce import IGNORE_INDEX, count_target_tokens, normalise, target_mask
from potstill.losses.registry import resolve
from potstill.losses.sparse import bucket_log_probs, check_sparse, check_tail
from potstill.losses.weighting import Fixed, TeacherConfidence, mix

Tensor = torch.Tensor


@dataclass
class TeacherLogits:
    logits: Tensor
    """(N, V) or (..., V)"""


@dataclass
class TeacherHidden:
    hidden: Tensor
    """(N, H_t) final hidden states of the teacher"""
    weight: Tensor
    """(V, H_t) the teacher's lm_head"""
    bias: Tensor | None = None


@dataclass
class TeacherTopK:
    ids: Tensor
    """(N, k) token ids"""
    log_probs: Tensor
    """(N, k) log-probabilities at the distillation temperature"""


Teacher = TeacherLogits | TeacherHidden | TeacherTopK


@dataclass
class KDLoss:
    """The loss and what to log about it."""

    loss: Tensor
    """Scalar: Σ_tokens [(1 − kd_ratio) CE + kd_ratio T² soft] / num_target_tokens."""
    ce_sum: float
    """Σ CE over this batch's target tokens."""
    soft_sum: float
    """Σ soft divergence (before T²) over this batch's target tokens."""
    kd_ratio_mean: float
    """The mean α used over target tokens (for logging dynamic strategies)."""
    tokens: int
    """Target tokens in this batch."""


def chunk_teacher(teacher: Teacher, start: int, end: int) -> tuple[str, Tensor, Tensor | None]:
    if isinstance(teacher, TeacherTopK):
        return "topk", teacher.ids[start:end], teacher.log_probs[start:end]
    if isinstance(teacher, TeacherHidden):
        logits = teacher.hidden[start:end] @ teacher.weight.T
        if teacher.bias is not None:
            logits = logits + teacher.bias
        return "dense", logits, None
    return "dense", teacher.logits[start:end], None


def token_losses(
    student_logits, labels, teacher_part, *, core, temperature, tail, kd_ratio, row_offset=0
):
    """Per-token CE, soft divergence and kd_ratio for one chunk. (c, V), (c,) -> three (c,)

    `teacher_part` is ("dense", logits (c, V), None) or ("topk", ids (c, k), log_probs (c, k)).
    """
    kind, t_main, t_log_probs = teacher_part
    z = upcast(student_logits)
    log_q1 = F.log_softmax(z, dim=-1)
    log_q = log_q1 if temperature == 1.0 else F.log_softmax(z / temperature, -1)
    safe_labels = labels.clamp(min=0).unsqueeze(-1)
    ce = -log_q1.gather(-1, safe_labels).squeeze(-1)
    if kind == "topk":
        check_sparse(student_logits, t_main, t_log_probs, row_offset)
        soft = core(*bucket_log_probs(log_q, t_main, t_log_probs, tail))
    else:
        check_pair(student_logits, t_main, row_offset)
        log_p = F.log_softmax(upcast(t_main) / temperature, dim=-1)
        soft = core(log_q, log_p)
    if kind == "topk":
        a = token_kd_ratio(
            kd_ratio,
            labels,
            teacher_ids=t_main,
            teacher_log_probs=t_log_probs,
            vocab_size=student_logits.shape[-1],
        )
    else:
        a = token_kd_ratio(
            kd_ratio, labels, teacher_logits=t_main, log_p=log_p if temperature == 1.0 else None
        )
    return ce, soft, a


@torch.no_grad()
def token_kd_ratio(
    kd_ratio,
    labels,
    *,
    teacher_logits=None,
    log_p=None,
    teacher_ids=None,
    teacher_log_probs=None,
    vocab_size=None,
):
    """kd_ratio per token (c,): the number itself, or TeacherConfidence from the teacher at T = 1
    (dense: its logits, or `log_p` when already at T = 1; sparse: its top-k ids and log-probs)."""
    if not isinstance(kd_ratio, TeacherConfidence):
        return torch.full(labels.shape, kd_ratio)
    if teacher_ids is not None:
        return kd_ratio(
            teacher_log_probs=teacher_log_probs,
            labels=labels,
            teacher_ids=teacher_ids,
            vocab_size=vocab_size,
        )
    if log_p is None:
        log_p = F.log_softmax(upcast(teacher_logits), -1)
    return kd_ratio(teacher_log_probs=log_p, labels=labels)


def check_arguments(
    labels, divergence, params, temperature, tail, kd_ratio, num_target_tokens, ignore_index
):
    """Both losses' argument checks: (registry row, its bound params, kd_ratio, target tokens)."""
    check_temperature(temperature)
    check_tail(tail)
    if isinstance(kd_ratio, Fixed):
        kd_ratio = kd_ratio()
    if not isinstance(kd_ratio, TeacherConfidence):
        if not isinstance(kd_ratio, int | float):
            raise ValueError(
                f"kd_ratio takes a number or TeacherConfidence, got {type(kd_ratio).__name__}; "
                "evaluate step-dependent strategies in the loop: kd_ratio=schedule(step=step)"
            )
        if not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")
        kd_ratio = float(kd_ratio)
    row, bound = resolve(divergence, params)
    if num_target_tokens is None:
        num_target_tokens = count_target_tokens(labels, ignore_index)
    return row, bound, kd_ratio, int(num_target_tokens)


def kd_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher: Teacher,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    kd_ratio=0.5,
    num_target_tokens: int | None = None,
    tail: str = "bucket",
    ignore_index: int = IGNORE_INDEX,
    **params: float,
) -> KDLoss:
    """The plain (unchunked) loss from student logits, for any teacher. (N, V), (N,) -> KDLoss

    `kd_ratio` (the α of the mix) is a number in [0, 1] (for `Schedule` and `Balance`, their
    value for this step), `Fixed`, or `TeacherConfidence` (per token). `params` is the
    divergence's own parameters (`beta` for jsd, `alpha` for the skew KLs; defaults from the
    registry). `num_target_tokens` is the count over the whole accumulation window (defaults to
    this batch's).
    """
    student_logits = student_logits.reshape(-1, student_logits.shape[-1])
    labels = labels.reshape(-1)
    row, bound, kd_ratio, n = check_arguments(
        labels, divergence, params, temperature, tail, kd_ratio, num_target_tokens, ignore_index
    )
    part = chunk_teacher(flatten_teacher(teacher), 0, labels.shape[0])
    ce, soft, a = token_losses(
        student_logits,
        labels,
        part,
        core=functools.partial(row.core, **bound),
        temperature=temperature,
        tail=tail,
        kd_ratio=kd_ratio,
    )
    mask = target_mask(labels, ignore_index)
    return KDLoss(
        loss=normalise(mix(ce, soft, a, temperature), mask, n),
        ce_sum=float(ce.detach()[mask].sum()),
        soft_sum=float(soft.detach()[mask].sum()),
        kd_ratio_mean=float(a[mask].mean()) if mask.any() else math.nan,
        tokens=int(mask.sum()),
    )


def flatten_teacher(teacher: Teacher) -> Teacher:
    if isinstance(teacher, TeacherLogits):
        return TeacherLogits(teacher.logits.reshape(-1, teacher.logits.shape[-1]))
    if isinstance(teacher, TeacherHidden):
        return TeacherHidden(
            teacher.hidden.reshape(-1, teacher.hidden.shape[-1]), teacher.weight, teacher.bias
        )
    return TeacherTopK(
        teacher.ids.reshape(-1, teacher.ids.shape[-1]),
        teacher.log_probs.reshape(-1, teacher.log_probs.shape[-1]),
    )
