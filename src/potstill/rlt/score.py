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

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from potstill.config import check
from potstill.config.sections import ModelConfig
from potstill.errors import DataError
from potstill.rlt.prompts import RLTTags, Sample, split_explanation
from potstill.rlt.rewards import RewardConfig, RLTModels, reward_batch
from potstill.rlt.unclosed import rank_unclosed_last


@dataclass
class RLTFields:
    """Which record fields hold what the reward reads, so records of any stage can be scored:
    `rlt explain` writes question/solution/explanation (the defaults); `generate`, `curate` and
    `eval` records hold the trace in `completion` and the reference in `solution` or `answer`."""

    question: str = "question"
    """Field with the question (the student's prompt)."""
    solution: str = "solution"
    """Field with the reference solution the student is scored on (e.g. `answer`)."""
    explanation: str = "explanation"
    """Field with the explanation to score (`completion` for generate, curate or eval output)."""

    def __post_init__(self):
        for role in ("question", "solution", "explanation"):
            name = getattr(self, role)
            check(isinstance(name, str) and name.strip() != "", f"{role}: must name a field")


@dataclass
class RLTScoring:
    """Who scores explanations with the RLT reward, and how (teacher and student must share a
    vocabulary): `rlt score`'s config, and curate's `rlt` section for select.order=rlt_reward."""

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
    fields: RLTFields = field(default_factory=RLTFields)
    """Which record fields hold question, solution and explanation (e.g. explanation:
    completion, solution: answer for `generate` output)."""
    tags: RLTTags = field(default_factory=RLTTags)
    """Section tags; keep them equal to the ones the explanations were generated with."""
    teacher_system_prompt: str | None = "rlt_teacher"
    """Bundled prompt name or .txt file: the teacher's system prompt (null = none)."""
    student_system_prompt: str | None = "rlt_student"
    """Bundled prompt name or .txt file: the student's system prompt (null = none)."""

    def __post_init__(self):
        check(self.batch_size > 0, f"batch_size: must be > 0, got {self.batch_size}")


def check_fields(records: Sequence[dict], source: str, fields: RLTFields | None = None) -> None:
    """DataError naming the first record without a mapped text field, before any model work (a
    long job should not fail half-way on record 10,000)."""
    fields = fields or RLTFields()
    for i, record in enumerate(records):
        for role in ("question", "solution", "explanation"):
            name = getattr(fields, role)
            if not isinstance(record.get(name), str):
                hint = (
                    " (generate, curate and eval write `completion`)"
                    if role == "explanation"
                    else ""
                )
                raise DataError(
                    f"{source}: record '{record.get('id', i)}' has no text field '{name}' "
                    f"(fields.{role}); set fields.{role} to the record field that holds the "
                    f"{role}{hint}"
                )


def _sample(record: dict, tags: RLTTags, fields: RLTFields) -> Sample:
    explanation, closed = split_explanation(record[fields.explanation], tags)
    closed = closed or record.get("explanation_closed", True) is not False
    question, solution = record[fields.question], record[fields.solution]
    return Sample(question, solution, explanation, closed, str(record["id"]))


def score_batches(records: Sequence[dict], tags: RLTTags, fields: RLTFields, batch_size: int):
    """The samples of `records` and the batches they are scored in (lists of record indices):
    by question and length, so a question's explanations share a batch (their common prefix
    runs once) and padding stays small. Both engines score these batches."""
    samples = [_sample(r, tags, fields) for r in records]
    order = sorted(
        range(len(samples)),
        key=lambda i: (samples[i].question, samples[i].solution, len(samples[i].explanation)),
    )
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return samples, batches


def scored_records(
    records: Sequence[dict], samples: Sequence[Sample], results: Sequence, cfg: RewardConfig
) -> list[dict]:
    """The records with their results (RewardResult) added, in input order; a record whose
    result is None (its batch failed on Ray) is left out, and ranks no unclosed one."""
    kept = [i for i, result in enumerate(results) if result is not None]
    groups = [(samples[i].question, samples[i].solution) for i in kept]
    ranked = rank_unclosed_last([results[i] for i in kept], groups, cfg.missing_tag_reward)
    return [_scored(records[i], result) for i, result in zip(kept, ranked, strict=True)]


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
    fields: RLTFields | None = None,
    on_batch: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """Records with the RLT reward and its parts added, in input order.

    `teacher` and `student` are (model, tokenizer) pairs. Records are batched by
    `score_batches`. `on_batch(n)` is told after every batch of n records.
    """
    fields = fields or RLTFields()
    check_fields(records, source, fields)
    tags = tags or RLTTags()
    cfg = cfg or RewardConfig()
    models = RLTModels(
        teacher[0], teacher[1], student[0], student[1], tags,
        teacher_system_prompt, student_system_prompt,
    )  # fmt: skip
    samples, batches = score_batches(records, tags, fields, batch_size)
    results: list = [None] * len(records)
    for chunk in batches:
        for i, result in zip(
            chunk, reward_batch(models, [samples[i] for i in chunk], cfg), strict=True
        ):
            results[i] = result
        on_batch(len(chunk))
    return scored_records(records, samples, results, cfg)


def _scored(record: dict, result) -> dict:
    record = dict(record)
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
    return record


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


def score_with(cfg: RLTScoring, records: list[dict], source: str, console) -> list[dict]:
    """Load `cfg`'s teacher and student (vocabularies checked first) and score `records` with
    a progress bar: what `rlt score` and curate's rlt_reward selection do."""
    check_fields(records, source, cfg.fields)
    check_pair_vocab(cfg.teacher, cfg.student)  # before loading two models
    teacher, student = load_pair(cfg)
    with scoring_progress(console, len(records)) as advance:
        return score_records(
            records, teacher, student, cfg.reward, cfg.batch_size, tags=cfg.tags,
            teacher_system_prompt=cfg.teacher_system_prompt,
            student_system_prompt=cfg.student_system_prompt, fields=cfg.fields, source=source,
            on_batch=advance,
        )  # fmt: skip


def load_pair(cfg: RLTScoring) -> tuple[tuple, tuple]:
    """The (model, tokenizer) of `cfg`'s teacher and student (one load when they are equal)."""
    teacher = load_eval_model(cfg.teacher)
    return teacher, teacher if cfg.student == cfg.teacher else load_eval_model(cfg.student)


@contextlib.contextmanager
def scoring_progress(console, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar over `total` records; yields the function that advances it by n."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("score", total=total)
        yield lambda n: progress.advance(task, n)
