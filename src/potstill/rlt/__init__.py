"""Reinforcement-learned teachers (Sakana AI RLT, arXiv 2506.08388): prompts, rewards, scoring.

A teacher that is shown the solution writes an explanation; it is rewarded when the explanation
makes the solution likely for a student (r^SS) and reads like something the student could have
thought itself (r^KL). See docs/rlt.md.
"""

from potstill.rlt.prompts import (
    RLTTags,
    RLTText,
    Sample,
    build_student_text,
    build_teacher_text,
    split_explanation,
    system_prompt,
    teacher_prefill,
    teacher_request,
)
from potstill.rlt.rewards import (
    RewardConfig,
    RewardResult,
    RLTModels,
    kl_penalty,
    make_rlt_reward,
    reward_batch,
    reward_per_sample,
    solution_reward,
)

__all__ = [
    "RLTModels",
    "RLTTags",
    "RLTText",
    "RewardConfig",
    "RewardResult",
    "Sample",
    "build_student_text",
    "build_teacher_text",
    "kl_penalty",
    "make_rlt_reward",
    "reward_batch",
    "reward_per_sample",
    "solution_reward",
    "split_explanation",
    "system_prompt",
    "teacher_prefill",
    "teacher_request",
]
