"""Evaluation: accuracy with real verifiers (pass@k, maj@k) and cost (size, memory, speed, $)."""

from potstill.eval.bench import maj_at_k, pass_at_k, score_samples
from potstill.eval.cost import price_per_1k_answers

__all__ = ["maj_at_k", "pass_at_k", "price_per_1k_answers", "score_samples"]
