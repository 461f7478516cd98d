"""Divergences between a teacher's and a student's token distributions, as pure functions.

Every function takes logits whose last dimension is the vocabulary and returns one value per token
(shape = the leading dims), computed in float32 at least (half-precision inputs are upcast):

    fn(student_logits, teacher_logits, *, temperature=1.0, ...) -> per-token tensor

with p = softmax(teacher_logits / T) and q = softmax(student_logits / T). The T² factor of Hinton et
al. (2015), which keeps the soft loss's gradients on the scale of the hard loss, is *not* applied
here: `potstill.losses.weighting.mix` applies it once, where hard and soft losses are mixed.

Conventions (see docs/losses.md):
- forward KL = KL(p ‖ q) (mean-seeking), reverse KL = KL(q ‖ p) (mode-seeking; MiniLLM);
- jsd(β) = β KL(p ‖ m) + (1 − β) KL(q ‖ m), m = β p + (1 − β) q. It is continuous in β and 0 at
  β = 0 and β = 1. TRL's `generalized_jsd_loss` uses the same formula inside (0, 1) but switches to
  KL(p ‖ q) at β = 0 and KL(q ‖ p) at β = 1; those are the limits of jsd(β)/β and jsd(β)/(1 − β);
- skew_forward_kl(α) = KL(p ‖ α p + (1 − α) q), skew_reverse_kl(α) = KL(q ‖ α q + (1 − α) p)
  (DistiLLM, Ko et al. 2024); α = 0 gives the plain KLs;
- tvd = ½ Σ |p − q|.

Which divergences exist, and their parameters, is `potstill.losses.registry` (`DIVERGENCES`,
`divergence_names()`, `register`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; 1.0 leaves logits unchanged")


def check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_pair(student_logits: Tensor, teacher_logits: Tensor, row_offset: int = 0) -> None:
    """Shapes must match exactly; the teacher's logits must be finite (says where they are not).

    `row_offset` is added to the first index in messages (for chunks of a larger tensor).
    """
    check_shapes(tuple(student_logits.shape), tuple(teacher_logits.shape))
    check_finite(teacher_logits, "teacher logits", row_offset)


def check_shapes(student: tuple, teacher: tuple) -> None:
    """Student and teacher logits (or their shapes to come) must match, vocabulary included."""
    if student != teacher:
        hint = (
            "the vocabularies differ: distil only between models that share a tokenizer"
            if student[:-1] == teacher[:-1]
            else "align the teacher's and student's tokens (same batch, same sequence positions)"
        )
        raise ValueError(
            f"student logits {student} and teacher logits {teacher} differ in shape; {hint}"
        )


def check_finite(values: Tensor, name: str, row_offset: int = 0) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        first = [int(i) for i in bad.nonzero()[0]]
        first[0] += row_offset
        raise ValueError(
            f"{name} hold NaN/inf, the first at index {tuple(first)}; "
            "check the teacher's dtype (fp16 overflows) and its inputs"
        )


def upcast(x: Tensor) -> Tensor:
    """float32 for half-precision inputs; float64 stays float64 (for reference computations)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(upcast(logits) / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dim from log-probabilities; 0·log 0 counts as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 − w) b), stable, exact at w = 0 and w = 1."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def prepare(student_logits, teacher_logits, temperature):
    """Checked (log q, log p) at temperature T from logits. (..., V), (..., V) -> two (..., V)"""
    check_temperature(temperature)
    check_pair(student_logits, teacher_logits)
    return _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)


# Cores: (log_q, log_p, **params) -> per token, on normalised log-probabilities. The public
# functions below validate and soften logits, then call these; the chunked and sparse paths call
# them directly on log-probabilities they already have. Each is one row of
# potstill.losses.registry, which holds the names, kernels and parameter defaults.


def forward_kl_core(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl(log_p, log_q)


def reverse_kl_core(log_q: Tensor, log_p: Tensor) -> Tensor:
    return _kl(log_q, log_p)


def jsd_core(log_q: Tensor, log_p: Tensor, beta: float = 0.5) -> Tensor:
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def skew_forward_kl_core(log_q: Tensor, log_p: Tensor, alpha: float = 0.1) -> Tensor:
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_kl_core(log_q: Tensor, log_p: Tensor, alpha: float = 0.1) -> Tensor:
    return _kl(log_q, _log_mix(log_q, log_p, alpha))


def tvd_core(log_q: Tensor, log_p: Tensor) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """KL(p_teacher ‖ q_student) per token. (..., V), (..., V) -> (...)"""
    return forward_kl_core(*prepare(student_logits, teacher_logits, temperature))


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """KL(q_student ‖ p_teacher) per token (Gu et al. 2024, MiniLLM). (..., V), (..., V) -> (...)"""
    return reverse_kl_core(*prepare(student_logits, teacher_logits, temperature))


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """Generalised Jensen-Shannon divergence (Agarwal et al. 2024, GKD). (..., V) -> (...)

    β KL(p ‖ m) + (1 − β) KL(q ‖ m) with m = β p + (1 − β) q; β = 0.5 is the symmetric JSD.
    """
    check_unit("beta", beta)
    return jsd_core(*prepare(student_logits, teacher_logits, temperature), beta=beta)


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """KL(p ‖ α p + (1 − α) q) per token (Ko et al. 2024, DistiLLM). (..., V) -> (...)"""
    check_unit("alpha", alpha)
    return skew_forward_kl_core(*prepare(student_logits, teacher_logits, temperature), alpha=alpha)


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """KL(q ‖ α q + (1 − α) p) per token (Ko et al. 2024, DistiLLM). (..., V) -> (...)"""
    check_unit("alpha", alpha)
    return skew_reverse_kl_core(*prepare(student_logits, teacher_logits, temperature), alpha=alpha)


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance ½ Σ |p − q| per token. (..., V), (..., V) -> (...)"""
    return tvd_core(*prepare(student_logits, teacher_logits, temperature))
