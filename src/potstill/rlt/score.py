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

from potstill.config.sections import ModelConfig
from potstill.errors import DataError
from potstill.rlt.prompts import RLTTags, Sample, split_explanation
from potstill.rlt.rewards import RewardConfig, RLTModels, reward_batch

REQUIRED = ("solution", "explanation")


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
