"""Hard + soft distillation loss from hidden states, chunk by chunk: full [N, V] logits never exist.

The student's final hidden states and lm_head weight go in; for each chunk of tokens the logits are
computed, the per-token loss (hard-label CE fused with the soft divergence) and its gradient with
respect to those logits are taken at once, and the gradient is pushed through the lm_head right
away (grad_hidden = g W, grad_W += gᵀ h). Backward then only hands back the stored gradients:
no second pass, no recomputed projections. The matmuls are the three a plain loss needs (plus the
teacher's projection when it is given as hidden states); everything else is elementwise per chunk.

The teacher is one of `TeacherLogits` (dense logits), `TeacherHidden` (hidden states + lm_head:
online distillation, its logits are also made per chunk) or `TeacherTopK` (an offline cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from potstill.losses.divergences import (
    check_finite,
    check_pair,
    check_shapes,
    check_temperature,
    resolve,
    upcast,
)
from potstill.losses.fused import run_dense_chunk
from potstill.losses.reduce import (
    IGNORE_INDEX,
    count_target_tokens,
    normalise,
    target_mask,
    token_weights,
)
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


def _chunk_teacher(teacher: Teacher, start: int, end: int) -> tuple[str, Tensor, Tensor | None]:
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
        a = _token_kd_ratio(
            kd_ratio,
            labels,
            teacher_ids=t_main,
            teacher_log_probs=t_log_probs,
            vocab_size=student_logits.shape[-1],
        )
    else:
        a = _token_kd_ratio(
            kd_ratio, labels, teacher_logits=t_main, log_p=log_p if temperature == 1.0 else None
        )
    return ce, soft, a


@torch.no_grad()
def _token_kd_ratio(
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


def _setup(
    labels, divergence, params, temperature, tail, kd_ratio, num_target_tokens, ignore_index
):
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
    core = resolve(divergence, params)
    if num_target_tokens is None:
        num_target_tokens = count_target_tokens(labels, ignore_index)
    return core, kd_ratio, int(num_target_tokens)


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
    divergence's own parameter (`beta` for jsd, `alpha` for the skew KLs). `num_target_tokens`
    is the count over the whole accumulation window (defaults to this batch's).
    """
    student_logits = student_logits.reshape(-1, student_logits.shape[-1])
    labels = labels.reshape(-1)
    core, kd_ratio, n = _setup(
        labels, divergence, params, temperature, tail, kd_ratio, num_target_tokens, ignore_index
    )
    part = _chunk_teacher(_flatten_teacher(teacher), 0, labels.shape[0])
    ce, soft, a = token_losses(
        student_logits,
        labels,
        part,
        core=core,
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


def _flatten_teacher(teacher: Teacher) -> Teacher:
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


def _check_dense_teacher(teacher, rows: int, vocab: int) -> None:
    if isinstance(teacher, TeacherLogits):
        shape = tuple(teacher.logits.shape)
    else:
        shape = (teacher.hidden.shape[0], teacher.weight.shape[0])
    check_shapes((rows, vocab), shape)


def _dense_step(
    logits, t_logits, labels, mask, n, divergence, param, temperature, kd_ratio, row_offset, pad_to
):
    """One chunk through the closed-form kernel: loss, ∂loss/∂logits and the per-token parts."""
    a = _token_kd_ratio(kd_ratio, labels, teacher_logits=t_logits)
    weight = token_weights(mask, n)
    w_ce, w_soft = (weight * (1.0 - a)).unsqueeze(-1), (weight * a).unsqueeze(-1)
    safe_labels = labels.clamp(min=0)
    args = [logits, t_logits, safe_labels, w_ce, w_soft]
    rows = logits.shape[0]
    if pad_to is not None and rows < pad_to:  # one compiled shape for every chunk
        args = [F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad_to - rows)) for x in args]
    ce, soft, g, finite = run_dense_chunk(
        *args, temperature, divergence, param, compile=pad_to is not None
    )
    ce, soft, g, finite = ce[:rows], soft[:rows], g[:rows], finite[:rows]
    if not bool(finite.all()):
        check_finite(t_logits, "teacher logits", row_offset)
    g.scatter_add_(-1, safe_labels.unsqueeze(-1), -w_ce)
    loss = (w_ce.squeeze(-1) * ce + w_soft.squeeze(-1) * temperature**2 * soft).sum()
    return loss, g, ce, soft, a


def default_chunk_size(vocab_size: int, budget_bytes: int = 1 << 29) -> int:
    """Rows per chunk (a power of two) so one (chunk, V) float32 tensor stays under `budget_bytes`.

    512 MiB gives 512 rows for a 152k vocabulary: matmuls of fewer rows lose efficiency on CPU
    (256 rows made the forward projection 30% slower), more rows only cost memory.
    """
    rows = max(budget_bytes // (4 * vocab_size), 16)
    return 1 << (rows.bit_length() - 1)


class _FusedKD(torch.autograd.Function):
    """Forward computes the loss and every gradient; backward scales and returns them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, compute):
        loss, grad_hidden, grad_weight, grad_bias = compute(ctx.needs_input_grad)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.saved_tensors
        if float(grad_loss) != 1.0:
            grads = [None if g is None else g * grad_loss for g in grads]
        return grads[0], grads[1], grads[2], None


def chunked_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    teacher: Teacher,
    *,
    student_bias: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    kd_ratio=0.5,
    num_target_tokens: int | None = None,
    tail: str = "bucket",
    chunk_size: int | None = None,
    compile: bool | None = None,
    ignore_index: int = IGNORE_INDEX,
    **params: float,
) -> KDLoss:
    """`kd_loss` from hidden states and the lm_head, never building [N, V]. Exact gradients.

    student_hidden: (..., H) already aligned with `labels` (...) (shift before calling);
    student_weight: (V, H). Same arguments and result as `kd_loss`. Dense teachers use the
    closed-form kernels of `potstill.losses.fused`; `compile` runs them through torch.compile
    (None = when a chunk holds at least 4M logits, i.e. real vocabularies).
    """
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    labels = labels.reshape(-1)
    teacher = _flatten_teacher(teacher)
    core, kd_ratio, n = _setup(
        labels, divergence, params, temperature, tail, kd_ratio, num_target_tokens, ignore_index
    )
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{hidden.shape[0]} hidden states but {labels.shape[0]} labels; align them"
        )
    vocab = student_weight.shape[0]
    chunk = max(1, min(chunk_size or default_chunk_size(vocab), hidden.shape[0]))
    stats = {"ce": 0.0, "soft": 0.0, "kd_ratio": 0.0}
    mask = target_mask(labels, ignore_index)

    dense = not isinstance(teacher, TeacherTopK)
    if dense:
        _check_dense_teacher(teacher, hidden.shape[0], vocab)
    if compile is None:
        compile = chunk * vocab >= 1 << 22
    param = float(next(iter(params.values()), 0.0))  # resolve() allowed at most the one it takes

    def compute(needs_grad):
        h_all, w = hidden.detach(), student_weight.detach()
        grad_h = torch.zeros_like(h_all) if needs_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32) if needs_grad[1] else None
        has_bias = student_bias is not None
        grad_b = torch.zeros(vocab, dtype=torch.float32) if has_bias and needs_grad[2] else None
        total = torch.zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            m = mask[start:end]
            if not m.any():
                continue
            h = h_all[start:end]
            logits = h @ w.T
            if has_bias:
                logits = logits + student_bias.detach()
            part = _chunk_teacher(teacher, start, end)
            if dense:
                chunk_loss, g, ce, soft, a = _dense_step(
                    logits,
                    part[1],
                    labels[start:end],
                    m,
                    n,
                    divergence,
                    param,
                    temperature,
                    kd_ratio,
                    start,
                    chunk if compile else None,
                )
            else:
                logits = logits.float().requires_grad_()
                with torch.enable_grad():
                    ce, soft, a = token_losses(
                        logits,
                        labels[start:end],
                        part,
                        core=core,
                        temperature=temperature,
                        tail=tail,
                        kd_ratio=kd_ratio,
                        row_offset=start,
                    )
                    chunk_loss = normalise(mix(ce, soft, a, temperature), m, n)
                    (g,) = torch.autograd.grad(chunk_loss, logits)
            total += chunk_loss.detach()
            stats["ce"] += float(ce.detach()[m].sum())
            stats["soft"] += float(soft.detach()[m].sum())
            stats["kd_ratio"] += float(a[m].sum())
            if grad_h is not None:
                grad_h[start:end] = g.to(w.dtype) @ w
            if grad_w is not None:  # accumulated in float32 whatever the weights' dtype
                grad_w.addmm_(g.T, h.float())
            if grad_b is not None:
                grad_b += g.sum(0)
        return (
            total,
            grad_h.reshape(student_hidden.shape) if grad_h is not None else None,
            grad_w.to(w.dtype) if grad_w is not None else None,
            grad_b.to(w.dtype) if grad_b is not None else None,
        )

    loss = _FusedKD.apply(student_hidden, student_weight, student_bias, compute)
    tokens = int(mask.sum())
    return KDLoss(
        loss,
        stats["ce"],
        stats["soft"],
        stats["kd_ratio"] / tokens if tokens else math.nan,
        tokens,
    )
