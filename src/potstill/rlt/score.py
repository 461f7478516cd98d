"""`potstill rlt score`: the RLT reward of every record's explanation, added to the record.

    potstill rlt score --teacher qwen2.5-coder-0.5b-instruct \\
        --student qwen2.5-coder-0.5b-instruct --in explained.jsonl --out scored.jsonl \\
        [--config configs/rlt_score.yaml]

Each record needs `question`, `solution` and `explanation`; it gains `rlt_reward`, `r_ss`, `r_kl`,
`solution_tokens` and `explanation_tokens` (nothing renamed). `explanation_closed: false` marks an
explanation the teacher never closed (it gets the missing-tag reward); an explanation that still
holds the closing tag is cut there. A record too long for a model keeps its fields and gets a
`drop_reason` instead of a reward. Curation can then keep the best explanation per question.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from potstill.config import check
from potstill.data import read_records, write_records
from potstill.errors import DataError
from potstill.rlt.prompts import RLTTags, Sample, split_explanation
from potstill.rlt.rewards import RewardConfig, RLTModels, reward_batch
from potstill.sections import ModelConfig

REQUIRED = ("solution", "explanation")


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


def check_fields(records: Sequence[dict], source: str) -> None:
    """DataError naming the first record without a solution or explanation, before any model
    work (a long job should not fail half-way on record 10,000)."""
    for i, record in enumerate(records):
        for name in REQUIRED:
            if not isinstance(record.get(name), str):
                raise DataError(
                    f"{source}: record '{record.get('id', i)}' has no '{name}' field; RLT scoring "
                    "needs question, solution and explanation (run the teacher's explain step "
                    "first, or give records that carry them)"
                )


def _sample(record: dict, tags: RLTTags) -> Sample:
    explanation, closed = split_explanation(record["explanation"], tags)
    closed = closed or record.get("explanation_closed", True) is not False
    return Sample(record["question"], record["solution"], explanation, closed, str(record["id"]))


def score_records(
    records: Sequence[dict],
    teacher: tuple,
    student: tuple,
    cfg: RewardConfig | None = None,
    batch_size: int = 8,
    *,
    tags: RLTTags | None = None,
    teacher_system_prompt: str | None = "rlt_teacher",
    student_system_prompt: str | None = "rlt_student",
    source: str = "records",
    on_batch: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """Records with the RLT reward and its parts added, in input order.

    `teacher` and `student` are (model, tokenizer) pairs. Records are batched by question and
    length, so a question's explanations share a batch (their common prefix runs once) and
    padding stays small. `on_batch(n)` is told after every batch of n records.
    """
    check_fields(records, source)
    tags = tags or RLTTags()
    models = RLTModels(
        teacher[0], teacher[1], student[0], student[1], tags,
        teacher_system_prompt, student_system_prompt,
    )  # fmt: skip
    samples = [_sample(r, tags) for r in records]
    order = sorted(
        range(len(samples)),
        key=lambda i: (samples[i].question, samples[i].solution, len(samples[i].explanation)),
    )
    out: list[dict | None] = [None] * len(records)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        results = reward_batch(models, [samples[i] for i in chunk], cfg)
        for i, result in zip(chunk, results, strict=True):
            record = dict(records[i])
            if result.skipped is not None:
                record["drop_reason"] = result.skipped
            else:
                record.update(
                    rlt_reward=result.rlt_reward,
                    r_ss=result.r_ss,
                    r_kl=result.r_kl,
                    solution_tokens=result.solution_tokens,
                    explanation_tokens=result.explanation_tokens,
                    explanation_closed=result.closed,
                )
            out[i] = record
        on_batch(len(chunk))
    return [r for r in out if r is not None]


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); nan where undefined."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def check_pair_vocab(teacher: ModelConfig, student: ModelConfig) -> None:
    """ModelError unless the two models' tokenizers share one vocabulary (tokenizers only: a
    mismatch is refused before any weights load)."""
    from potstill.models import check_same_vocab, load_tokenizer

    check_same_vocab(
        load_tokenizer(teacher.name, trust_remote_code=teacher.trust_remote_code),
        load_tokenizer(student.name, trust_remote_code=student.trust_remote_code),
    )


def load_eval_model(model_cfg: ModelConfig):
    from potstill.models import load_configured

    model, tokenizer = load_configured(model_cfg)
    return model.eval(), tokenizer


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
