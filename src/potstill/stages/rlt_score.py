"""`potstill rlt score`: the RLT reward of explanations for a student.

potstill rlt score --teacher T --student S --in explained.jsonl --out scored.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from potstill.config import check
from potstill.config.sections import ModelConfig
from potstill.data import read_records, write_records
from potstill.rlt.prompts import RLTTags
from potstill.rlt.rewards import RewardConfig
from potstill.rlt.score import (
    check_fields,
    check_pair_vocab,
    load_eval_model,
    mean_and_stderr,
    score_records,
)


@dataclass
class RLTScoreConfig:
    """Score explanations with the RLT reward (teacher and student must share a vocabulary)."""

    teacher: ModelConfig = field(default_factory=ModelConfig)
    """The teacher π_θ that wrote the explanations (it sees the solution)."""
    student: ModelConfig = field(
        default_factory=lambda: ModelConfig(name="qwen2.5-coder-1.5b-instruct")
    )
    """The student π_s the explanations are for (it does not see the solution)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward weights, temperature, reductions."""
    batch_size: int = 8
    """Records per forward pass (one teacher and one student forward per batch)."""
    tags: RLTTags = field(default_factory=RLTTags)
    """Section tags; keep them equal to the ones the explanations were generated with."""
    teacher_system_prompt: str | None = "rlt_teacher"
    """Bundled prompt name or .txt file: the teacher's system prompt (null = none)."""
    student_system_prompt: str | None = "rlt_student"
    """Bundled prompt name or .txt file: the student's system prompt (null = none)."""

    def __post_init__(self):
        check(self.batch_size > 0, f"batch_size: must be > 0, got {self.batch_size}")


def run_score(
    cfg: RLTScoreConfig, in_path: str | Path, out_path: str | Path, console: Console | None = None
) -> dict:
    """Read records, score them, write them atomically to `out_path`; returns the counts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = console or Console(stderr=True)
    records = read_records(in_path)
    check_fields(records, str(in_path))  # before loading two models
    console.print(f"[bold]{len(records)}[/] records from {in_path}")
    check_pair_vocab(cfg.teacher, cfg.student)  # before loading two models
    teacher = load_eval_model(cfg.teacher)
    student = teacher if cfg.student == cfg.teacher else load_eval_model(cfg.student)
    with Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), console=console
    ) as progress:
        task = progress.add_task("score", total=len(records))
        scored = score_records(
            records,
            teacher,
            student,
            cfg.reward,
            cfg.batch_size,
            tags=cfg.tags,
            teacher_system_prompt=cfg.teacher_system_prompt,
            student_system_prompt=cfg.student_system_prompt,
            source=str(in_path),
            on_batch=lambda n: progress.advance(task, n),
        )
    write_records(out_path, scored)
    rewards = [r["rlt_reward"] for r in scored if "rlt_reward" in r]
    mean, stderr = mean_and_stderr(rewards)
    stats = {
        "records": len(scored),
        "scored": len(rewards),
        "skipped": len(scored) - len(rewards),
        "unclosed": sum(1 for r in scored if r.get("explanation_closed") is False),
        "mean_reward": mean,
        "reward_stderr": stderr,
    }
    console.print(
        f"scored {stats['scored']} (mean reward {mean:.4f} ± {stderr:.4f} s.e.), "
        f"{stats['unclosed']} without the closing tag (reward {cfg.reward.missing_tag_reward}), "
        f"{stats['skipped']} skipped as too long → {out_path}"
    )
    return stats
