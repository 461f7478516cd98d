"""The default reward of an explanation the teacher never closed: last in its group."""

from __future__ import annotations

import pytest


def test_an_unclosed_explanation_ranks_below_every_closed_one_of_its_question():
    """The default missing-tag reward, over random groups of random rewards on any scale: every
    unclosed explanation scores below every closed explanation of its question (and exactly
    UNCLOSED_MARGIN below the lowest); a fixed reward stays fixed; skipped ones stay unscored."""
    import random

    from potstill.rlt.rewards import RewardResult
    from potstill.rlt.unclosed import NOTHING_CLOSED, UNCLOSED_MARGIN, rank_unclosed_last

    rng = random.Random(0)
    for _ in range(300):
        scale = 10 ** rng.uniform(-2, 3)
        rows = []
        for _ in range(rng.randint(1, 12)):
            closed, skipped = rng.random() < 0.6, rng.random() < 0.1
            reward = None if skipped else (rng.gauss(-5, 2) * scale if closed else float("nan"))
            rows.append(RewardResult(reward, 0.0, 0.0, 1, 1, closed, "long" if skipped else None))
        groups = [rng.randint(0, 2) for _ in rows]
        out = rank_unclosed_last(rows, groups, None)
        closed_all = [r.rlt_reward for r in out if r.closed and r.rlt_reward is not None]
        for r, g in zip(out, groups, strict=True):
            if r.skipped:
                assert r.rlt_reward is None
            elif not r.closed:
                rivals = [
                    o.rlt_reward for o, h in zip(out, groups, strict=True)
                    if h == g and o.closed and o.rlt_reward is not None
                ] or closed_all  # fmt: skip
                want = min(rivals) - UNCLOSED_MARGIN if rivals else NOTHING_CLOSED
                assert r.rlt_reward == pytest.approx(want)
                assert all(r.rlt_reward < v for v in rivals)
        fixed = rank_unclosed_last(rows, groups, -2.5)
        assert all(r.rlt_reward == -2.5 for r in fixed if not r.closed and not r.skipped)


def test_an_empty_explanation_ranks_with_the_unclosed_ones():
    """Closed at once: r^KL over no tokens is 0, so r^SS − λ·0 beat every real explanation and
    GRPO learned to write nothing (docs/experiments.md); it now ranks last, like an unclosed one."""
    from potstill.rlt.rewards import RewardResult
    from potstill.rlt.unclosed import UNCLOSED_MARGIN, rank_unclosed_last

    real = [RewardResult(-6.0, -1.2, 1.6, 9, 30, True), RewardResult(-4.5, -1.0, 1.2, 9, 25, True)]
    empty = RewardResult(float("nan"), -1.5, 0.0, 9, 0, True)
    out = rank_unclosed_last([*real, empty], [0, 0, 0], None)
    assert [r.rlt_reward for r in out] == [-6.0, -4.5, -6.0 - UNCLOSED_MARGIN]
    fixed = rank_unclosed_last([*real, empty], [0, 0, 0], -10.0)
    assert [r.rlt_reward for r in fixed] == [-6.0, -4.5, -10.0]
