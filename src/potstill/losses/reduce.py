"""Masking and normalising, in one place.

Per-token losses are summed over the tokens that have a target and divided by the number of target
tokens in the whole gradient-accumulation window — not per micro-batch. Dividing per micro-batch
weights a token in a short micro-batch more than one in a long one, so 8 micro-batches of 1 would
not equal 1 batch of 8 (TRL and DistillKit both shipped this bug).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def target_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """True where a token has a target. (...) -> (...) bool"""
    return labels != ignore_index


def count_target_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Tokens with a target; sum this over every micro-batch of an accumulation window."""
    return int(target_mask(labels, ignore_index).sum())


def masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over tokens where mask is True; masked values (even NaN) never leak in. (...) -> ()"""
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum()


def token_weights(mask: torch.Tensor, num_target_tokens: int) -> torch.Tensor:
    """Each token's weight in the window's mean: mask / num_target_tokens. (...) -> (...) float

    The closed-form kernels scale per-token gradients by these; `normalise` is the same rule.
    """
    if num_target_tokens < 0:
        raise ValueError(f"num_target_tokens must be >= 0, got {num_target_tokens}")
    return mask.float() / max(num_target_tokens, 1)


def normalise(per_token: torch.Tensor, mask: torch.Tensor, num_target_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the window's mean loss: Σ_masked / num_target_tokens.

    `num_target_tokens` counts the target tokens of the whole accumulation window (all
    micro-batches, all processes). A window with no target tokens contributes 0 (and zero
    gradients), not NaN.
    """
    if num_target_tokens < 0:
        raise ValueError(f"num_target_tokens must be >= 0, got {num_target_tokens}")
    return masked_sum(per_token, mask) / max(num_target_tokens, 1)
