"""The curation stage of sequence-level distillation: teacher samples in, good ones out.

    potstill curate --config configs/curate-gsm.yaml [--set select.k=1 ...]

Steps run in a fixed order, cheap checks first so the verifier and the rewriter see less:
format -> length -> verify -> dedup -> teacher_unsolved -> student_solves -> select -> rewrite.
`teacher_unsolved` drops no records (verify already did); it reports the questions no teacher
sample solved. `student_solves` runs only with `student_samples`, `rewrite` only when enabled.

The run directory gets `kept.jsonl`, `dropped.jsonl` (every dropped record with its `drop_reason`
and the step, `dropped_at`: nothing is lost silently), `funnel.json`, the resolved config and a
manifest. Rerunning on the same directory redoes the cheap steps and resumes the rewrite.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from potstill.config import check, shown
from potstill.config.sections import (
    BackendConfig,
    ModelConfig,
    SamplingConfig,
    check_given,
    check_seed,
)
from potstill.curate.filters import (
    check_format,
    check_length,
    dedup_samples,
    drop_solved_by_student,
    solve_rates,
    verify_samples,
)
from potstill.curate.funnel import Funnel, count_questions
from potstill.curate.select import select_per_question
from potstill.data import read_records
from potstill.errors import ConfigError, DataError

STEP_ORDER = (
    "format",
    "length",
    "verify",
    "dedup",
    "teacher_unsolved",
    "student_solves",
    "select",
    "rewrite",
)


@dataclass
class FormatConfig:
    drop_truncated: bool = True
    """Drop traces cut off by max_new_tokens (finish_reason "length")."""
    tags: list[list[str]] = field(default_factory=lambda: [["<think>", "</think>"]])
    """[open, close] tag pairs a trace must open and close in order; [] turns the check off."""
    require: str | None = None
    """A regex every trace must contain (re.search), e.g. '\\\\boxed\\{'; null = no requirement."""

    def __post_init__(self):
        for pair in self.tags:
            check(
                len(pair) == 2 and all(tag.strip() for tag in pair),
                "tags: each entry must be an [open, close] pair of non-empty tags, got "
                + shown(pair),
            )
        if self.require is not None:
            try:
                re.compile(self.require)
            except (re.error, OverflowError, RecursionError) as exc:
                # a{99999999999} overflows the repeat count; 1000 nested groups the parser
                raise ConfigError(
                    f"require: {shown(self.require)} is not a valid regex ({exc})"
                ) from None


@dataclass
class LengthConfig:
    min_tokens: int = 1
    """Drop traces with fewer completion tokens (whitespace words when the count is missing)."""
    max_tokens: int | None = None
    """Drop traces with more completion tokens; null = no limit."""

    def __post_init__(self):
        check(self.min_tokens >= 0, f"min_tokens: must be >= 0, got {self.min_tokens}")
        check(
            self.max_tokens is None or self.max_tokens >= self.min_tokens,
            f"max_tokens: must be >= min_tokens ({self.min_tokens}), got {self.max_tokens}",
        )


@dataclass
class VerifyConfig:
    threshold: float = 1.0
    """A sample is verified when its verifier score (in [0, 1]) is >= this; reasoning-gym
    scorers give partial credit, lower this to accept it."""

    def __post_init__(self):
        check(0 < self.threshold <= 1, f"threshold: must be in (0, 1], got {self.threshold}")


@dataclass
class DedupConfig:
    exact: bool = True
    """Drop traces equal to an earlier one after normalising case and whitespace."""
    near: bool = True
    """Drop traces whose estimated word n-gram Jaccard similarity to an earlier one is high."""
    threshold: float = 0.8
    """Near-duplicate when the MinHash Jaccard estimate is >= this."""
    ngram: int = 3
    """Words per n-gram (shingle)."""
    num_perm: int = 128
    """MinHash permutations: more = a finer estimate, slower."""
    scope: Literal["question", "all"] = "question"
    """question: compare one question's samples with each other; all: across the whole set."""

    def __post_init__(self):
        check(0 < self.threshold <= 1, f"threshold: must be in (0, 1], got {self.threshold}")
        check(self.ngram > 0, f"ngram: must be > 0, got {self.ngram}")
        check(self.num_perm >= 16, f"num_perm: must be >= 16, got {self.num_perm}")


@dataclass
class DifficultyConfig:
    threshold: float = 0.75
    """Drop a question when the student solves its own samples of it at this rate or more
    (needs student_samples)."""

    def __post_init__(self):
        check(0 < self.threshold <= 1, f"threshold: must be in (0, 1], got {self.threshold}")


@dataclass
class SelectConfig:
    k: int | None = 4
    """Keep at most this many verified samples per question; null = keep all."""
    order: Literal["shortest", "diverse", "rlt_reward"] = "shortest"
    """shortest: fewest completion tokens first; diverse: farthest-first by n-gram distance;
    rlt_reward: the highest RLT reward for a student first (records scored by `rlt score`, or
    scored here with the `rlt` section's teacher and student)."""
    ngram: int = 3
    """Words per n-gram for the diverse order's distance."""

    def __post_init__(self):
        check(self.k is None or self.k > 0, f"k: must be > 0 (or null for all), got {self.k}")
        check(self.ngram > 0, f"ngram: must be > 0, got {self.ngram}")


@dataclass
class RewriteConfig(SamplingConfig):
    enabled: bool = False
    """Restructure each kept trace with a model; a rewrite is kept only if it still verifies."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The rewriting model (any size; it sees only the trace)."""
    backend: BackendConfig = field(default_factory=BackendConfig)
    """Generation engine for the rewriting model."""
    prompt_file: str | None = None
    """Rewrite instructions (the system prompt): a .txt file path or a bundled prompt name."""
    max_new_tokens: int = 4096
    """Longest rewrite; a truncated rewrite is discarded (the original stays)."""
    batch_size: int = 8
    """Prompts per generate call (hf backend)."""
    seed: int = 0
    """Base seed; each record derives its own from it and its id."""

    def __post_init__(self):
        super().__post_init__()
        check(
            not self.enabled or bool(self.prompt_file),
            "prompt_file: rewrite is enabled but no prompt is given; set rewrite.prompt_file "
            "to a .txt file with the rewrite instructions",
        )
        check(self.batch_size > 0, f"batch_size: must be > 0, got {self.batch_size}")
        check_given(self.prompt_file, "prompt_file", "a .txt file or a bundled prompt name")
        check_seed(self.seed)


Rewriter = Callable[[list[dict]], list[dict]]
"""Kept records in, the same records (rewritten or annotated) out, in order."""


def curate_records(
    records: list[dict],
    cfg,
    *,
    student_rates: dict[str, float] | None = None,
    rewriter: Rewriter | None = None,
    scorer: Rewriter | None = None,
) -> tuple[list[dict], list[dict], Funnel]:
    """Run the steps in STEP_ORDER; return (kept, dropped, funnel).

    Dropped records carry `drop_reason` and `dropped_at` (the step's name). `student_rates` (per
    question) enables student_solves; `rewriter` enables rewrite; `scorer` adds the RLT reward
    to the records that reach selection (for select.order = rlt_reward).
    """
    funnel = Funnel(input_records=len(records), input_questions=count_questions(records))
    dropped_all: list[dict] = []
    kept = records

    def step(name: str, split, **funnel_args) -> None:
        nonlocal kept
        new_kept, dropped = split
        funnel.add(name, kept, new_kept, dropped, **funnel_args)
        dropped_all.extend({**r, "dropped_at": name} for r in dropped)
        kept = new_kept

    fmt, length, dedup = cfg.format, cfg.length, cfg.dedup
    step(
        "format",
        check_format(kept, drop_truncated=fmt.drop_truncated, tags=fmt.tags, require=fmt.require),
    )
    step("length", check_length(kept, min_tokens=length.min_tokens, max_tokens=length.max_tokens))
    reaching_verify = count_questions(kept)
    step("verify", verify_samples(kept, threshold=cfg.verify.threshold))
    step(
        "dedup",
        dedup_samples(
            kept,
            exact=dedup.exact,
            near=dedup.near,
            threshold=dedup.threshold,
            ngram=dedup.ngram,
            num_perm=dedup.num_perm,
            scope=dedup.scope,
        ),
    )
    unsolved = reaching_verify - count_questions(kept)
    step(
        "teacher_unsolved",
        (kept, []),
        questions_in=reaching_verify,
        notes={"unsolved_questions": unsolved},
    )
    if student_rates is not None:
        threshold = cfg.difficulty.threshold
        step("student_solves", drop_solved_by_student(kept, student_rates, threshold=threshold))
    select = cfg.select
    if scorer is not None and kept:
        kept = scorer(kept)
    step("select", select_per_question(kept, k=select.k, order=select.order, ngram=select.ngram))
    if rewriter is not None and kept:
        rewritten = rewriter(kept)
        statuses = Counter(r["rewrite"]["status"] for r in rewritten)
        step("rewrite", (rewritten, []), notes=dict(sorted(statuses.items())))

    if sorted(r["id"] for r in kept + dropped_all) != sorted(r["id"] for r in records):
        raise AssertionError("curation lost or duplicated records: kept + dropped != input")
    return kept, dropped_all, funnel


def require_completions(records: list[dict], source: str, what: str = "data.source") -> None:
    """Curation filters samples: refuse questions that were never answered, naming one."""
    missing = [r["id"] for r in records if not isinstance(r.get("completion"), str)]
    if missing:
        raise DataError(
            f"{what} {source}: record '{missing[0]}' has no 'completion' ({len(missing)} of "
            f"{len(records)} records lack one); curate takes model samples: run "
            "`potstill generate` first and point it at the samples directory it writes"
        )


def read_student_rates(spec: str, threshold: float) -> dict[str, float]:
    """Per-question solve rate of the student's own samples, verified like the teacher's."""
    path = Path(spec.partition("?")[0]).expanduser()
    if not spec.startswith("rg:") and not path.exists():
        raise ConfigError(
            f"student_samples: {path} not found; sample the student with `potstill generate` "
            "(model = the student) and give its samples directory, or set student_samples: null"
        )
    student = read_records(spec)
    require_completions(student, spec, what="student_samples")
    return solve_rates(student, threshold=threshold)
