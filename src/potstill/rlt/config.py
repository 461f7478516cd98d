"""Configs of the RLT stages: `rlt warmup`, `rlt train` (GRPO) and `rlt explain`.

Every stage reads records with a question and its solution (the warm-up also an explanation);
the tags and system prompts must be the same in every stage of one teacher, which is why they
sit at the top of each config under the same names as in `rlt score`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from potstill.config import check
from potstill.config.sections import (
    SOURCE,
    SamplingConfig,
    VLLMConfig,
    check_given,
    check_seed,
)

KIT_05B = "qwen2.5-coder-0.5b-instruct"


@dataclass
class RLTDataConfig:
    source: str = "rg:gsm_symbolic?size=256&seed=1"
    """Records: .jsonl, .parquet, a shard directory, a datasets directory or rg:TASK?…"""
    limit: int | None = None
    """Use only the first N records."""
    question_field: str = "question"
    """Field holding the question."""
    solution_field: str = "solution"
    """Field holding the solution the teacher is shown (gsm_symbolic: its worked answer)."""
    explanation_field: str = "explanation"
    """Field holding a reference explanation (warm-up only)."""

    def __post_init__(self):
        check_given(self.source, "source", SOURCE)
        check(self.limit is None or self.limit > 0, f"limit: must be > 0, got {self.limit}")


@dataclass
class GRPOConfig(SamplingConfig):
    group_size: int = 8
    """G: explanations sampled per question; advantages are (r − mean) / (std + 1e-4) per group."""
    beta: float = 0.04
    """Weight of the per-token KL to the reference model (k3 estimator); 0 = no reference."""
    ref_sync_every: int | None = None
    """Copy the policy into the reference every N steps (null: the reference stays the start)."""
    max_new_tokens: int = 256
    """Longest explanation sampled."""
    temperature: float = 0.7
    """Sampling temperature (the policy's log-probs in the loss are taken at it too)."""
    reward_batch_size: int = 8
    """Explanations per reward forward pass."""
    backend: Literal["hf", "vllm"] = "hf"
    """Rollout engine. hf: the live policy's own decode loop (CPU or GPU); vllm: a vLLM engine
    in the same process, the policy's weights pushed into it after every step (GPU)."""
    vllm: VLLMConfig = field(default_factory=lambda: VLLMConfig(gpu_memory_utilization=0.3))
    """The colocated engine's settings: its share of GPU memory leaves the rest to training."""

    def __post_init__(self):
        super().__post_init__()
        check(
            self.group_size >= 2,
            f"group_size: must be >= 2, got {self.group_size}; GRPO's advantage compares each "
            "explanation with the others of its question, so a group needs two or more",
        )
        check(self.beta >= 0, f"beta: must be >= 0, got {self.beta}")
        check(
            self.ref_sync_every is None or self.ref_sync_every > 0,
            f"ref_sync_every: must be > 0 or null, got {self.ref_sync_every}",
        )
        check(
            self.temperature > 0,
            f"temperature: must be > 0, got {self.temperature}; GRPO needs different samples "
            "per group",
        )
        check(
            self.reward_batch_size > 0,
            f"reward_batch_size: must be > 0, got {self.reward_batch_size}",
        )


@dataclass
class ExplainSampling(SamplingConfig):
    num_explanations: int = 4
    """N: explanations written per question."""
    max_new_tokens: int = 256
    """Longest explanation written."""
    temperature: float = 0.7
    """Sampling temperature of the explanations (the reward reads log-probs at it too)."""
    batch_size: int = 16
    """Requests per generation batch (hf backend)."""
    seed: int = 0
    """Explanation n of record r is drawn with a seed derived from (seed, r, n)."""

    def __post_init__(self):
        super().__post_init__()
        check(
            self.num_explanations > 0, f"num_explanations: must be > 0, got {self.num_explanations}"
        )
        check(self.batch_size > 0, f"batch_size: must be > 0, got {self.batch_size}")
        check_seed(self.seed)
