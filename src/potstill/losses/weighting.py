"""Mixing the hard-label loss with the soft (distillation) loss, with a fixed or dynamic weight.

    loss_t = (1 − α_t) · CE_t + α_t · T² · soft_t

T² (Hinton et al. 2015) is applied here and only here: softening logits by T shrinks the soft
loss's gradients by 1/T², and the factor restores their scale. α comes from a strategy:

- `Fixed(α)`;
- `Schedule(start, end, total_steps, shape)`: linear or cosine from `start` to `end` over training
  (the hard/soft balance moving during training, as in Llama 4's co-distillation);
- `TeacherConfidence(mode)`: per token, trust the teacher where it is sure and right. "gold": α =
  the teacher's probability of the gold token (→ 0 where the teacher puts ~0 on it); "entropy":
  α = 1 − H(p)/log V (→ 1 for a one-hot teacher, 0 for a uniform one); `floor`/`ceil` clamp it;
- `Balance(share)`: keeps the soft term's share of the loss at `share` from running (EMA)
  magnitudes of both terms: α = s·CE / (s·CE + (1 − s)·soft). Raw soft and hard losses are often
  100–1000× apart, which makes a fixed α meaningless.

Every strategy records the α it used last (`last_alpha`, a float mean) for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from potstill.losses.divergences import check_unit

Tensor = torch.Tensor


def mix(ce: Tensor, soft: Tensor, kd_ratio: Tensor | float, temperature: float = 1.0) -> Tensor:
    """(1 − α)·CE + α·T²·soft per token, α = kd_ratio. ce, soft: (...); kd_ratio: () or (...)"""
    return (1.0 - kd_ratio) * ce + kd_ratio * (temperature**2) * soft


@dataclass
class Fixed:
    alpha: float = 0.5
    last_alpha: float = field(default=math.nan, init=False)

    def __post_init__(self):
        check_unit("alpha", self.alpha)

    def __call__(self, *, step: int = 0, **_) -> float:
        self.last_alpha = self.alpha
        return self.alpha


@dataclass
class Schedule:
    """α = start at step 0, end at step `total_steps` (and after), linear or cosine between. A
    run of N steps numbered 0 .. N − 1 reaches `end` on its last one with total_steps = N − 1."""

    start: float = 0.0
    end: float = 1.0
    total_steps: int = 1000
    shape: str = "linear"
    """"linear" or "cosine" (cosine eases in and out)."""
    last_alpha: float = field(default=math.nan, init=False)

    def __post_init__(self):
        check_unit("start", self.start)
        check_unit("end", self.end)
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {self.total_steps}")
        if self.shape not in ("linear", "cosine"):
            raise ValueError(f"shape must be 'linear' or 'cosine', got {self.shape!r}")

    def __call__(self, *, step: int = 0, **_) -> float:
        progress = min(max(step / self.total_steps, 0.0), 1.0)
        if self.shape == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        # Weighted this way (not start + (end - start) * progress) both ends are exact.
        self.last_alpha = (1.0 - progress) * self.start + progress * self.end
        return self.last_alpha


@dataclass
class TeacherConfidence:
    mode: str = "gold"
    """"gold" (teacher's probability of the gold token) or "entropy" (1 − normalised entropy)."""
    floor: float = 0.0
    ceil: float = 1.0
    last_alpha: float = field(default=math.nan, init=False)

    def __post_init__(self):
        if self.mode not in ("gold", "entropy"):
            raise ValueError(f"mode must be 'gold' or 'entropy', got {self.mode!r}")
        check_unit("floor", self.floor)
        check_unit("ceil", self.ceil)
        if self.floor > self.ceil:
            raise ValueError(f"floor ({self.floor}) must not exceed ceil ({self.ceil})")

    @torch.no_grad()
    def __call__(
        self,
        *,
        teacher_log_probs: Tensor,
        labels: Tensor,
        teacher_ids: Tensor | None = None,
        vocab_size: int | None = None,
        **_,
    ) -> Tensor:
        """α per token from the teacher at temperature 1. labels: (...) -> α: (...)

        Dense teacher: teacher_log_probs (..., V). Top-k teacher: teacher_log_probs and
        teacher_ids (..., k) plus `vocab_size`; the gold token's probability is 0 outside the top
        k, and the entropy counts the tail as one outcome.
        """
        log_p = teacher_log_probs.float()
        p = log_p.exp()
        if self.mode == "gold":
            if teacher_ids is None:
                alpha = log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).exp()
            else:
                alpha = (p * (teacher_ids == labels.unsqueeze(-1))).sum(-1)
        else:
            entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
            if teacher_ids is not None:
                tail = (1.0 - p.sum(-1)).clamp(min=0.0)
                entropy = entropy - torch.where(tail > 0, tail * tail.log(), torch.zeros_like(tail))
            alpha = 1.0 - entropy / math.log(vocab_size or log_p.shape[-1])
        alpha = alpha.clamp(self.floor, self.ceil)
        valid = labels >= 0
        self.last_alpha = float(alpha[valid].mean()) if valid.any() else math.nan
        return alpha


@dataclass
class Balance:
    share: float = 0.5
    """Target share of the (T²-scaled) soft term in the loss."""
    momentum: float = 0.9
    """EMA momentum of the two terms' magnitudes."""
    ce_ema: float = field(default=math.nan, init=False)
    soft_ema: float = field(default=math.nan, init=False)
    last_alpha: float = field(default=math.nan, init=False)

    def __post_init__(self):
        check_unit("share", self.share)
        check_unit("momentum", self.momentum)

    def __call__(self, **_) -> float:
        """α for this step, from the magnitudes seen so far (`share` before any are seen)."""
        if math.isnan(self.ce_ema) or math.isnan(self.soft_ema):
            self.last_alpha = self.share
        else:
            ce, soft = self.share * self.ce_ema, (1.0 - self.share) * self.soft_ema
            self.last_alpha = ce / (ce + soft) if ce + soft > 0 else self.share
        return self.last_alpha

    def update(self, ce_mean: float, soft_mean: float) -> None:
        """Feed this step's mean CE and mean T²-scaled soft loss (detached floats)."""
        if not (math.isfinite(ce_mean) and math.isfinite(soft_mean)):
            return
        if math.isnan(self.ce_ema):
            self.ce_ema, self.soft_ema = ce_mean, soft_mean
        else:
            m = self.momentum
            self.ce_ema = m * self.ce_ema + (1 - m) * ce_mean
            self.soft_ema = m * self.soft_ema + (1 - m) * soft_mean


STRATEGIES = {
    "fixed": Fixed,
    "schedule": Schedule,
    "teacher_confidence": TeacherConfidence,
    "balance": Balance,
}
