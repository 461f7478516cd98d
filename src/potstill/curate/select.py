"""Rejection sampling: keep at most k verified samples per question (`over_k` for the rest).

    kept, dropped = select_per_question(verified, k=2, order="shortest")

`shortest` prefers the fewest completion tokens (ties by id): the student learns the most direct
correct route, and training is cheaper. `rlt_reward` prefers the trace that best teaches a named
student by the RLT reward (records scored by `rlt score`, or by curate's own `rlt` section).
`diverse` starts from the shortest, then repeatedly takes
the sample farthest (word n-gram Jaccard distance) from everything taken so far: k different
routes teach more than k paraphrases of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from potstill.curate.filters import Split, completion_tokens, question_id, word_ngrams


def jaccard_distance(a: set[str], b: set[str]) -> float:
    """1 - |a & b| / |a | b|; two empty sets are identical (distance 0)."""
    union = len(a | b)
    return 1.0 - len(a & b) / union if union else 0.0


def select_per_question(
    records: Sequence[dict],
    *,
    k: int | None,
    order: Literal["shortest", "diverse", "rlt_reward"] = "shortest",
    ngram: int = 3,
) -> Split:
    """Keep up to `k` samples of each question (all when `k` is None), chosen by `order`.

    The input is meant to be verified samples (the pipeline runs this after verification).
    Kept records are grouped by question, questions in order of first appearance, each question's
    samples in the order they were chosen; dropped ones (`over_k`) keep the input order.
    """
    by_question: dict[str, list[dict]] = {}
    for record in records:
        by_question.setdefault(question_id(record), []).append(record)
    kept: list[dict] = []
    chosen_ids: set[str] = set()
    for samples in by_question.values():
        if order == "shortest":
            ranked = _shortest_first(samples)[:k]
        elif order == "rlt_reward":
            ranked = _best_reward_first(samples)[:k]
        else:
            ranked = _farthest_first(samples, ngram, k)
        for record in ranked:
            kept.append(dict(record))
            chosen_ids.add(record["id"])
    dropped = [{**r, "drop_reason": "over_k"} for r in records if r["id"] not in chosen_ids]
    return kept, dropped


def _best_reward_first(samples: list[dict]) -> list[dict]:
    """Highest RLT reward first (ties: shorter, then id); unscored samples (too long for a
    model: no `rlt_reward`) last, shortest first."""
    scored = [r for r in samples if isinstance(r.get("rlt_reward"), int | float)]
    unscored = [r for r in samples if not isinstance(r.get("rlt_reward"), int | float)]
    best = sorted(scored, key=lambda r: (-r["rlt_reward"], completion_tokens(r), r["id"]))
    return best + _shortest_first(unscored)


def _shortest_first(samples: list[dict]) -> list[dict]:
    return sorted(samples, key=lambda r: (completion_tokens(r), r["id"]))


def _farthest_first(samples: list[dict], ngram: int, k: int | None) -> list[dict]:
    """Greedy farthest-first traversal, `k` picks (all when None): each next pick maximises its
    minimum distance to the picks so far (ties: shorter, then smaller id), starting from the
    shortest sample."""
    if k == 0:
        return []
    remaining = _shortest_first(samples)
    grams = {r["id"]: word_ngrams(r["completion"], ngram) for r in remaining}
    picked = [remaining.pop(0)] if remaining else []
    nearest = {r["id"]: jaccard_distance(grams[r["id"]], grams[picked[0]["id"]]) for r in remaining}
    while remaining and (k is None or len(picked) < k):
        # `remaining` is sorted shortest-first, so max() keeps the shortest of equally far ones.
        best = max(remaining, key=lambda r: nearest[r["id"]])
        remaining.remove(best)
        picked.append(best)
        for r in remaining:
            distance = jaccard_distance(grams[r["id"]], grams[best["id"]])
            nearest[r["id"]] = min(nearest[r["id"]], distance)
    return picked
