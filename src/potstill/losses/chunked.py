"""Hard + soft distillation loss from hidden states, chunk by chunk: full [N, V] logits never exist.

The student's final hidden states and lm_head weight go in; for each chunk of tokens the logits are
computed, the per-token loss (hard-label CE fused with the soft divergence) and its gradient with
respect to those logits are taken at once, and the gradient is pushed through the lm_head right
away (grad_hidden = g W, grad_W += gᵀ h). Backward then only hands back the stored gradients:
no second pass, no recomputed projections. The matmuls are the three a plain loss needs (plus the
teacher's projection when it is given as hidden states); everything else is elementwise per chunk.

The teacher is one of `TeacherLogits`, `TeacherHidden` (its logits are also made per chunk) or
`TeacherTopK` (see `potstill.losses.plain`, which also holds the unchunked `kd_loss`).

Chunk size: `chunk_rows(V)` rows, so that the [chunk, V] float32 buffers one chunk holds at its peak
(`ROW_BUFFERS`) fit `CHUNK_BUDGET`, whatever the vocabulary. Compiled, every chunk has that shape
(the last one padded with zero-weight rows), so torch.compile compiles once per (chunk, V) and not
once per token count. Eager, a batch is cut into at least two chunks: plain PyTorch holds 7 or
more [N, V] buffers, one eager chunk up to 13, so half the rows keeps eager under plain.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from potstill.losses.divergences import check_finite, check_shapes
from potstill.losses.fused import CompileFailed, autograd_kernel, compile_failed, run_dense_chunk
from potstill.losses.plain import (
    KDLoss,
    Teacher,
    TeacherHidden,
    TeacherLogits,
    TeacherTopK,
    check_arguments,
    chunk_teacher,
    flatten_teacher,
    kd_loss,
    token_kd_ratio,
    token_losses,
)
from potstill.losses.reduce import IGNORE_INDEX, normalise, target_mask, token_weights
from potstill.losses.registry import Divergence
from potstill.losses.weighting import mix

# Re-exported: callers import the teacher kinds and kd_loss from here too.
__all__ = [
    "KDLoss",
    "TeacherHidden",
    "TeacherLogits",
    "TeacherTopK",
    "chunk_rows",
    "chunked_kd_loss",
    "default_chunk_size",
    "kd_loss",
]

Tensor = torch.Tensor


def _check_dense_teacher(teacher, rows: int, vocab: int) -> None:
    if isinstance(teacher, TeacherLogits):
        shape = tuple(teacher.logits.shape)
    else:
        shape = (teacher.hidden.shape[0], teacher.weight.shape[0])
    check_shapes((rows, vocab), shape)


def _dense_step(
    logits, t_logits, labels, mask, n, kernel, params, temperature, kd_ratio, row_offset, pad_to
):
    """One chunk through a fused kernel: loss, ∂loss/∂logits and the per-token parts."""
    a = token_kd_ratio(kd_ratio, labels, teacher_logits=t_logits)
    weight = token_weights(mask, n)
    w_ce, w_soft = (weight * (1.0 - a)).unsqueeze(-1), (weight * a).unsqueeze(-1)
    safe_labels = labels.clamp(min=0)
    args = [logits, t_logits, safe_labels, w_ce, w_soft]
    rows = logits.shape[0]
    if pad_to is not None and rows < pad_to:  # one compiled shape for every chunk
        args = [F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad_to - rows)) for x in args]
    ce, soft, g, finite = run_dense_chunk(
        *args, temperature, kernel, params, compile=pad_to is not None
    )
    ce, soft, g, finite = ce[:rows], soft[:rows], g[:rows], finite[:rows]
    if not bool(finite.all()):
        check_finite(t_logits, "teacher logits", row_offset)
    g.scatter_add_(-1, safe_labels.unsqueeze(-1), -w_ce)
    loss = (w_ce.squeeze(-1) * ce + w_soft.squeeze(-1) * temperature**2 * soft).sum()
    return loss, g, ce, soft, a


CHUNK_BUDGET = 1 << 30
"""Bytes of [chunk, V] float32 buffers one chunk of the fused loss may hold at its peak (1 GiB).
Fewer rows cost speed: at V = 151,936, H = 896 the three lm_head matmuls of a 64-row chunk ran
~1.6x slower per row than those of a 512-row one, of a 128-row one ~1.2x (2 busy CPU cores)."""
ROW_BUFFERS = 13
"""[chunk, V] float32 buffers one chunk holds at its peak, the most measured over the paths:
eager closed-form kernels 9 (forward KL, T = 1, teacher logits) to 13 (JSD or a skew KL at
T != 1, teacher hidden states: logits, teacher logits, log q, q at T = 1 and at T, log p, p, the
kernel's temporaries, the gradient); autograd kernels 10-12; top-k teachers 6-7; compiled 2-5,
plus 2 padded copies in the last chunk."""
ROW_MULTIPLE, MAX_ROWS = 16, 4096


def chunk_rows(
    vocab_size: int, *, buffers: int = ROW_BUFFERS, budget_bytes: int = CHUNK_BUDGET
) -> int:
    """Rows per chunk of the fused loss: the most rows, a multiple of 16 in [16, 4096], with
    rows × V × 4 bytes × `buffers` ≤ `budget_bytes`.

    The defaults give 640 rows at V = 32,000, 416 at 49,152, 160 at 128,256, 128 at 151,936 and
    64 at 262,144.
    """
    rows = budget_bytes // (vocab_size * 4 * buffers) // ROW_MULTIPLE * ROW_MULTIPLE
    return min(max(rows, ROW_MULTIPLE), MAX_ROWS)


def default_chunk_size(vocab_size: int, budget_bytes: int = 1 << 29) -> int:
    """Rows (a power of two) so one (chunk, V) float32 tensor stays under `budget_bytes`.

    For loops that hold about one such tensor per chunk (the teacher cache, the cross-vocabulary
    losses); the fused loss sizes its chunks by `chunk_rows`, which counts all its buffers.
    """
    rows = max(budget_bytes // (4 * vocab_size), 16)
    return 1 << (rows.bit_length() - 1)


def eager_chunk_rows(chunk: int, rows: int) -> int:
    """Rows per eager chunk: at most `chunk`, and at most half the batch (see the module doc)."""
    return min(chunk, max(1, -(-rows // 2)))


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


@dataclass
class _Plan:
    """What every chunk of one `chunked_kd_loss` call shares."""

    labels: Tensor
    mask: Tensor
    teacher: Teacher
    n: int
    row: Divergence
    bound: dict
    temperature: float
    kd_ratio: object
    tail: str
    chunk: int
    compile: bool

    @property
    def dense(self) -> bool:
        return not isinstance(self.teacher, TeacherTopK)

    def chunk_loss(self, logits: Tensor, start: int, end: int):
        """(loss, ∂loss/∂logits (c, V), ce, soft, kd_ratio (c,)) for rows start:end."""
        part = chunk_teacher(self.teacher, start, end)
        labels, mask = self.labels[start:end], self.mask[start:end]
        if self.dense:
            # Without a closed form the same fused step takes ∂D/∂s by autograd through the core.
            kernel = self.row.kernel or autograd_kernel(self.row.core)
            return _dense_step(
                logits,
                part[1],
                labels,
                mask,
                self.n,
                kernel,
                self.bound,
                self.temperature,
                self.kd_ratio,
                start,
                self.chunk if self.compile else None,
            )
        logits = logits.float().requires_grad_()
        with torch.enable_grad():
            ce, soft, a = token_losses(
                logits,
                labels,
                part,
                core=functools.partial(self.row.core, **self.bound),
                temperature=self.temperature,
                tail=self.tail,
                kd_ratio=self.kd_ratio,
                row_offset=start,
            )
            loss = normalise(mix(ce, soft, a, self.temperature), mask, self.n)
            (g,) = torch.autograd.grad(loss, logits)
        return loss, g, ce, soft, a


def _run_chunks(plan: _Plan, stats: dict, hidden, weight, bias, needs_grad):
    """Loss and the gradients for (hidden, weight, bias), chunk by chunk; fills `stats`."""
    h_all, w = hidden.detach(), weight.detach()
    rows, vocab = h_all.shape[0], w.shape[0]
    grad_h = torch.zeros_like(h_all) if needs_grad[0] else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32) if needs_grad[1] else None
    grad_b = torch.zeros(vocab, dtype=torch.float32) if bias is not None and needs_grad[2] else None
    total = torch.zeros((), dtype=torch.float32)
    for start in range(0, rows, plan.chunk):
        end = min(start + plan.chunk, rows)
        m = plan.mask[start:end]
        if not m.any():
            continue
        h = h_all[start:end]
        logits = h @ w.T
        if bias is not None:
            logits = logits + bias.detach()
        chunk_loss, g, ce, soft, a = plan.chunk_loss(logits, start, end)
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
        grad_h,
        grad_w.to(w.dtype) if grad_w is not None else None,
        grad_b.to(w.dtype) if grad_b is not None else None,
    )


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
    divergence's closed-form kernel (`potstill.losses.fused`), or autograd through its core where
    its registry row has none. `chunk_size` rows go through the lm_head at a time (None:
    `chunk_rows(V)`, sized to `CHUNK_BUDGET`). `compile` runs closed-form kernels through
    torch.compile, every chunk padded to `chunk_size` rows (None = when the batch fills at least
    one chunk of at least 4M logits, i.e. real vocabularies).
    """
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    labels = labels.reshape(-1)
    teacher = flatten_teacher(teacher)
    row, bound, kd_ratio, n = check_arguments(
        labels, divergence, params, temperature, tail, kd_ratio, num_target_tokens, ignore_index
    )
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{hidden.shape[0]} hidden states but {labels.shape[0]} labels; align them"
        )
    vocab, rows = student_weight.shape[0], hidden.shape[0]
    chunk = chunk_size or chunk_rows(vocab)
    if not isinstance(teacher, TeacherTopK):
        _check_dense_teacher(teacher, rows, vocab)
    if compile is None:  # one fixed shape pays once a batch fills a chunk of a real vocabulary
        compile = rows >= chunk and chunk * vocab >= 1 << 22
    # autograd.grad inside a compiled graph would break it: the autograd fallback stays eager.
    compile = compile and row.kernel is not None and not compile_failed()
    eager_rows = chunk if chunk_size else eager_chunk_rows(chunk, rows)
    mask = target_mask(labels, ignore_index)
    plan = _Plan(
        labels,
        mask,
        teacher,
        n,
        row,
        bound,
        temperature,
        kd_ratio,
        tail,
        chunk if compile else eager_rows,
        compile,
    )
    stats = {"ce": 0.0, "soft": 0.0, "kd_ratio": 0.0}

    def compute(needs_grad):
        nonlocal plan
        args = (stats, hidden, student_weight, student_bias, needs_grad)
        try:
            loss, grad_h, grad_w, grad_b = _run_chunks(plan, *args)
        except CompileFailed:
            # The chunks were cut and padded for the compiled kernel: redo the call eager.
            plan = dataclasses.replace(plan, chunk=eager_rows, compile=False)
            stats.update(ce=0.0, soft=0.0, kd_ratio=0.0)
            loss, grad_h, grad_w, grad_b = _run_chunks(plan, *args)
        return (
            loss,
            grad_h.reshape(student_hidden.shape) if grad_h is not None else None,
            grad_w,
            grad_b,
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
