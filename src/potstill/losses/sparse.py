"""Divergences against a sparse teacher: its top-k token ids and log-probabilities per position.

An offline teacher cache stores only the top k of V probabilities. The rest of the teacher's mass
(the tail) is handled explicitly, in one of two ways:

- `tail="bucket"` (default): both distributions are coarse-grained onto k + 1 outcomes — the k
  cached tokens and one "everything else" bucket holding the teacher's tail mass 1 − Σ p_topk and
  the student's mass outside those k tokens. The divergence between these is exact for the
  coarse-grained distributions and, by the data-processing inequality, never exceeds the full one.
  It keeps the student accountable for the mass it leaks outside the teacher's top k.
- `tail="renormalise"`: the teacher's top k are renormalised to sum to 1 and so are the student's
  probabilities on the same k tokens. Cheaper to reason about, but the student may move any mass
  outside the top k without penalty.

With k = V both equal the dense divergence. Temperature applies to the student; the teacher's
log-probabilities are taken as cached, so cache them at the temperature you distil at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from potstill.losses.divergences import check_finite, check_temperature, upcast
from potstill.losses.registry import resolve

Tensor = torch.Tensor
TAILS = ("bucket", "renormalise")


def check_tail(tail: str) -> None:
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")


def check_sparse(
    student_logits: Tensor, teacher_ids: Tensor, teacher_log_probs: Tensor, row_offset: int = 0
) -> None:
    if teacher_ids.shape != teacher_log_probs.shape:
        raise ValueError(
            f"teacher ids {tuple(teacher_ids.shape)} and log-probs "
            f"{tuple(teacher_log_probs.shape)} differ in shape; they must be (..., k) both"
        )
    if student_logits.shape[:-1] != teacher_ids.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher top-k "
            f"{tuple(teacher_ids.shape)} cover different tokens; align them position by position"
        )
    vocab, k = student_logits.shape[-1], teacher_ids.shape[-1]
    if k > vocab:
        raise ValueError(f"k = {k} is larger than the vocabulary ({vocab}); use k <= {vocab}")
    if teacher_ids.numel() and (int(teacher_ids.min()) < 0 or int(teacher_ids.max()) >= vocab):
        raise ValueError(
            f"teacher ids must lie in [0, {vocab}), found {int(teacher_ids.min())}.."
            f"{int(teacher_ids.max())}: the cache was made with another vocabulary"
        )
    # -inf is a probability of 0, which is fine; NaN and +inf are not.
    check_finite(teacher_log_probs.clamp(min=-1e30), "teacher log-probs", row_offset)


def bucket_log_probs(
    log_q: Tensor, teacher_ids: Tensor, teacher_log_probs: Tensor, tail: str = "bucket"
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs over the k (+ 1 tail) outcomes.

    log_q: (..., V) student log-probs; teacher_ids, teacher_log_probs: (..., k) -> two (..., k[+1])
    """
    student_top = log_q.gather(-1, teacher_ids)
    teacher_top = upcast(teacher_log_probs)
    if tail == "renormalise":
        return (
            student_top - student_top.logsumexp(-1, keepdim=True),
            teacher_top - teacher_top.logsumexp(-1, keepdim=True),
        )
    # The student's tail is a logsumexp over the tokens outside the top k: exact even when tiny.
    outside = log_q.scatter(-1, teacher_ids, float("-inf"))
    student_tail = outside.logsumexp(-1, keepdim=True)
    top_mass = teacher_top.logsumexp(-1, keepdim=True).clamp(max=0.0)
    teacher_tail = torch.log(-torch.expm1(top_mass))  # log(1 − Σ p_topk)
    # When the k ids cover the whole vocabulary the bucket is empty on both sides, whatever
    # rounding left in 1 − Σ p_topk.
    teacher_tail = teacher_tail.masked_fill(student_tail == float("-inf"), float("-inf"))
    return torch.cat([student_top, student_tail], -1), torch.cat([teacher_top, teacher_tail], -1)


def sparse_divergence(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_log_probs: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    tail: str = "bucket",
    **params: float,
) -> Tensor:
    """A divergence against a top-k teacher, per token. (..., V), (..., k), (..., k) -> (...)

    `divergence` is any registered name (`potstill.losses.divergence_names()`) and `params` its
    parameters (beta, alpha; defaults from the registry).
    """
    check_temperature(temperature)
    check_tail(tail)
    row, bound = resolve(divergence, params)
    check_sparse(student_logits, teacher_ids, teacher_log_probs)
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    return row.core(*bucket_log_probs(log_q, teacher_ids, teacher_log_probs, tail), **bound)
