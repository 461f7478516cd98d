"""The reward of an explanation the teacher never closed.

A fixed penalty (the paper's −1) is not below every reward it competes with: on the CPU recipe a
warmed-up teacher's closed explanations score about −7, so −1 taught it never to close
(docs/experiments.md). By default the penalty is relative instead: `UNCLOSED_MARGIN` below the
lowest closed reward it competes with (the other explanations of its question; else every closed
explanation scored with it), so an unclosed explanation always ranks last in its group, whatever
the scale of the rewards.

An empty explanation (the closing tag at once) counts as unclosed: it explains nothing, and its
r^KL, a mean over no tokens, is 0, so it would beat every real explanation whose λ·r^KL outweighs
what it teaches. GRPO on the CPU recipe found that: from step 31 of 40 the teacher closed at once
every time (docs/experiments.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence

UNCLOSED_MARGIN = 1.0
"""How far below the lowest closed reward of its group an unclosed explanation lands."""
NOTHING_CLOSED = -1.0
"""An unclosed explanation's reward when nothing it competes with was closed (all tie)."""


def rank_unclosed_last(rewards: Sequence, groups: Sequence[Hashable], fixed: float | None):
    """`rewards` (RewardResult) with every unclosed, scored one's `rlt_reward` set: `fixed` when
    given, else UNCLOSED_MARGIN below the lowest closed reward of its group (`groups[i]` names
    sample i's question). Skipped samples (no reward) stay as they are."""
    if fixed is not None:
        return [_with(r, fixed) if _unclosed(r) else r for r in rewards]
    closed = [r.rlt_reward for r in rewards if r.rlt_reward is not None and _explains(r)]
    by_group: dict[Hashable, list[float]] = {}
    for r, group in zip(rewards, groups, strict=True):
        if r.rlt_reward is not None and _explains(r):
            by_group.setdefault(group, []).append(r.rlt_reward)
    out = []
    for r, group in zip(rewards, groups, strict=True):
        if _unclosed(r):
            rivals = by_group.get(group) or closed
            r = _with(r, min(rivals) - UNCLOSED_MARGIN if rivals else NOTHING_CLOSED)
        out.append(r)
    return out


def explains(closed: bool, explanation_tokens: int) -> bool:
    """A closed, non-empty explanation: one that earns r^SS − λ·r^KL (module docstring)."""
    return closed and explanation_tokens > 0


def _explains(r) -> bool:
    return explains(r.closed, r.explanation_tokens)


def _unclosed(r) -> bool:
    return not _explains(r) and r.skipped is None


def _with(r, reward: float):
    return dataclasses.replace(r, rlt_reward=reward)


def placeholder(fixed: float | None) -> float:
    """What a single reward computation stores for an unclosed explanation before its group is
    known: the fixed reward, or NaN to be filled by `rank_unclosed_last`."""
    return math.nan if fixed is None else fixed
