"""Accuracy from N verified samples per question: pass@1, pass@k (unbiased) and maj@k.

pass@k is the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
1 − C(n − c, k) / C(n, k), averaged over questions — the chance that at least one of k samples is
right, without the variance of drawing only k. maj@k takes the first k samples' answers, votes
(ties go to the answer seen first; samples that state no answer abstain), and scores the winner.
"""

from __future__ import annotations

from collections import Counter
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if not 0 <= c <= n:
        raise ValueError(f"correct samples c={c} must be in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, n={n}]: draw more samples per question")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def maj_at_k(answers: list[str | None], correct: list[bool], k: int) -> bool:
    """Whether the majority answer of the first k samples is correct (None = no answer)."""
    if not 1 <= k <= len(answers):
        raise ValueError(f"k={k} must be in [1, {len(answers)}]: draw more samples per question")
    votes = Counter(_normal(a) for a in answers[:k] if a is not None and _normal(a))
    if not votes:
        return False
    best = max(votes.values())
    for answer, ok in zip(answers[:k], correct[:k], strict=True):
        if answer is not None and votes.get(_normal(answer)) == best:
            return ok
    return False


def _normal(answer: str) -> str:
    return " ".join(answer.strip().lower().split())


def score_samples(samples: list[dict], ks: list[int]) -> dict:
    """Task-level metrics from sample records (each with `source_id`, `sample`, `answer_given`,
    `verified`). Every question must have the same number of samples."""
    by_question: dict[str, list[dict]] = {}
    for s in samples:
        by_question.setdefault(s["source_id"], []).append(s)
    if not by_question:
        raise ValueError("no samples to score")
    counts = {len(v) for v in by_question.values()}
    if len(counts) != 1:
        raise ValueError(
            f"questions have different sample counts {sorted(counts)}; rerun to finish"
        )
    n = counts.pop()
    pass_k, maj_k = {}, {}
    for k in sorted({k for k in ks if k <= n} | {1}):
        pass_k[str(k)] = _mean(
            pass_at_k(n, sum(s["verified"] for s in qs), k) for qs in by_question.values()
        )
        maj_k[str(k)] = _mean(maj_at_k(*_ordered(qs), k) for qs in by_question.values())
    correct_first = sum(
        min(qs, key=lambda s: s["sample"])["verified"] for qs in by_question.values()
    )
    return {
        "n": len(by_question),
        "samples": n,
        "correct": int(correct_first),
        "accuracy": pass_k["1"],
        "pass@k": pass_k,
        "maj@k": maj_k,
    }


def _ordered(samples: list[dict]) -> tuple[list[str | None], list[bool]]:
    ordered = sorted(samples, key=lambda s: s["sample"])
    return [s["answer_given"] for s in ordered], [bool(s["verified"]) for s in ordered]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
