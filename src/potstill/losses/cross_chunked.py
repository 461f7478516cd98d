"""Cross-vocabulary distillation from hidden states, chunk by chunk: neither side's [N, V]
logits is ever built whole.

The student's final hidden states at its N target positions (N, H_s) and its lm_head give the
hard loss (cross-entropy on every target) and, at the n ≤ N target positions paired with a
teacher position, the soft loss (`cross_vocab.uld` / `hybrid`) against the teacher's rows.
Built plainly, that is the student's (N, V_s) logits and the teacher's (n, V_t) ones at once:
for 4,096 targets with SmolLM2's 49,152 entries and Qwen's 151,936, 0.8 GB + 2.5 GB in float32
before any softmax or sort. Here the N rows are cut into chunks of c; a chunk projects its c
student rows, asks `teacher_rows` for the logits of the pairs that fall in it, reduces both to
two sums and, when gradients are wanted, computes the chunk's gradients of both sums at once
(a local backward) and frees it; the backward pass only scales them. So one chunk's [c, V_s] and
[≤ c, V_t] tensors exist at a time and nothing is computed twice (activation checkpointing
would run every chunk's softmaxes and sorts again in backward). The values and gradients are
those of the plain computation (summation order aside).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from potstill.losses.chunked import default_chunk_size

Tensor = torch.Tensor
TeacherRows = Callable[[int, int], Tensor]
"""(lo, hi) -> (hi - lo, V_t): the teacher's logits at pairs lo..hi-1, without gradients."""
SoftLoss = Callable[..., Tensor]
"""(student rows (k, V_s), teacher rows (k, V_t), chunk_size=...) -> (k,): `uld` or `hybrid`."""


def cross_chunk_rows(student_vocab: int, teacher_vocab: int) -> int:
    """Rows per chunk: a quarter of `default_chunk_size` at the larger vocabulary (a full sort
    holds ~5 float32 copies of a row: upcast, softmax, sorted values, int64 indices), i.e. 128
    rows for Qwen's 151,936 entries."""
    return max(1, default_chunk_size(max(student_vocab, teacher_vocab)) // 4)


def _logits_sums(logits, *, labels, local_pairs, teacher_rows, lo, hi, soft_loss):
    """(ce sum, soft sum) of one chunk's student logits (c, V_s): CE on every row, the
    soft loss on the rows paired with teacher rows lo..hi-1."""
    ce = F.cross_entropy(logits.float(), labels, reduction="sum")
    if hi == lo:
        return ce, ce.new_zeros(())
    teacher = teacher_rows(lo, hi)  # (hi - lo, V_t)
    soft = soft_loss(logits[local_pairs], teacher, chunk_size=hi - lo).sum()
    return ce, soft.float()


class _CrossSums(torch.autograd.Function):
    """Forward runs every chunk with its local backward (`_with_grads`); backward scales the
    stored gradients of the two sums by their incoming gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        sums, ctx.grads = run(hidden, weight, bias)
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        out = [
            None if pair is None else grad_sums[0] * pair[0] + grad_sums[1] * pair[1]
            for pair in ctx.grads
        ]
        return (*out, None)


def _with_grads(chunks, hidden, weight, bias):
    """(sums (2,), per input (d ce, d soft) or None): each chunk's gradients taken right after
    its forward, through its logits, then the chunk is freed."""
    wants = [t is not None and t.requires_grad for t in (hidden, weight, bias)]
    grads = [(torch.zeros_like(t), torch.zeros_like(t)) if w else None
             for t, w in zip((hidden, weight, bias), wants, strict=True)]  # fmt: skip
    w, b = weight.detach(), None if bias is None else bias.detach()
    totals = hidden.new_zeros(2, dtype=torch.float32)
    for start, end, step in chunks:
        h = hidden[start:end].detach()
        with torch.enable_grad():
            leaf = F.linear(h, w, b).detach().requires_grad_(True)
            ce, soft = step(leaf)
            paired = soft.requires_grad  # a chunk without pairs has no soft gradient
            d_logits_of = [torch.autograd.grad(ce, leaf, retain_graph=paired)[0]]
            if paired:
                d_logits_of.append(torch.autograd.grad(soft, leaf)[0])
        totals = totals + torch.stack([ce.detach(), soft.detach()])
        for k, d_logits in enumerate(d_logits_of):  # logits = h W^T + b
            if grads[0] is not None:
                grads[0][k][start:end] = d_logits @ w
            if grads[1] is not None:
                grads[1][k].add_(d_logits.T @ h)
            if grads[2] is not None:
                grads[2][k].add_(d_logits.sum(0))
    return totals, grads


def chunked_cross_sums(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    paired: Tensor,
    teacher_rows: TeacherRows,
    soft_loss: SoftLoss,
    *,
    teacher_vocab: int,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Σ CE over the N targets and Σ soft loss over the n pairs, float32 scalars.

    hidden (N, H) and labels (N,): the student's final hidden states and gold tokens at its
    target positions; weight (V_s, H) and bias: its lm_head. paired (n,): increasing indices
    into the N rows of the rows that have a teacher partner; pair j's teacher logits are
    `teacher_rows(j, j + 1)`. `soft_loss` is `uld` / `hybrid` with everything but the logits
    bound. Equal to `CE(hidden @ weight.T + bias, labels).sum()` and
    `soft_loss(logits[paired], teacher_rows(0, n)).sum()` computed whole.
    """
    rows = hidden.shape[0]
    if paired.dim() != 1 or (paired.numel() > 1 and not bool((paired[1:] > paired[:-1]).all())):
        raise ValueError("paired must be a 1-d tensor of strictly increasing row indices")
    if paired.numel() and not (0 <= int(paired[0]) and int(paired[-1]) < rows):
        raise ValueError(f"paired holds indices outside the {rows} student rows")
    chunk = cross_chunk_rows(weight.shape[0], teacher_vocab) if chunk_size is None else chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk!r}")
    starts = torch.arange(0, rows + chunk, chunk, device=paired.device).clamp(max=rows)
    bounds = torch.searchsorted(paired, starts).tolist()  # pairs [bounds[i], bounds[i+1])
    chunks = []
    for i, start in enumerate(range(0, rows, chunk)):
        end, lo, hi = min(start + chunk, rows), bounds[i], bounds[i + 1]
        step = functools.partial(
            _logits_sums, labels=labels[start:end], local_pairs=paired[lo:hi] - start,
            teacher_rows=teacher_rows, lo=lo, hi=hi, soft_loss=soft_loss,
        )  # fmt: skip
        chunks.append((start, end, step))
    needs_grad = hidden.requires_grad or weight.requires_grad
    needs_grad = needs_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        sums = _CrossSums.apply(hidden, weight, bias, functools.partial(_with_grads, chunks))
        return sums[0], sums[1]
    totals = hidden.new_zeros(2, dtype=torch.float32)
    for start, end, step in chunks:
        ce, soft = step(F.linear(hidden[start:end], weight, bias))
        totals = totals + torch.stack([ce, soft])
    return totals[0], totals[1]
