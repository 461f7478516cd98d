"""`potstill curate`: verify, filter, deduplicate and select teacher samples.

potstill curate --config configs/curate-gsm.yaml
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console

from potstill.config.sections import DataConfig, RunConfig, check_given
from potstill.curate.funnel import Funnel
from potstill.curate.pipeline import (
    DedupConfig,
    DifficultyConfig,
    FormatConfig,
    LengthConfig,
    RewriteConfig,
    SelectConfig,
    VerifyConfig,
    curate_records,
    read_student_rates,
    require_completions,
)
from potstill.curate.rewrite import pending_rewrites, rewrite_traces
from potstill.data import read_records, write_records
from potstill.errors import ConfigError
from potstill.fsutil import atomic_write_text
from potstill.rlt.score import RLTScoring, check_fields, score_with
from potstill.runs import RunDir
from potstill.teacher.backends import Backend, Sampling


@dataclass
class CurateConfig:
    """Curation of teacher samples: verify, filter, deduplicate, select (and optionally rewrite)."""

    data: DataConfig = field(default_factory=lambda: DataConfig(source="runs/generate/samples"))
    """Teacher samples (records with `completion`), e.g. the samples dir of `potstill generate`."""
    student_samples: str | None = None
    """The student's own samples of the same questions, to drop what it already solves."""
    format: FormatConfig = field(default_factory=FormatConfig)
    """Step 1: truncation, balanced tags, a required pattern."""
    length: LengthConfig = field(default_factory=LengthConfig)
    """Step 2: completion length bounds."""
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    """Step 3: the record's verifier (task field) must accept the answer."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Step 4: exact and near-duplicate traces."""
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)
    """Step 6: questions the student already solves (step 5 reports teacher-unsolved ones)."""
    select: SelectConfig = field(default_factory=SelectConfig)
    """Step 7: rejection sampling, at most k samples per question."""
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    """Step 8 (off by default): restructure kept traces with a model, re-verified."""
    rlt: RLTScoring | None = None
    """Teacher and student that score traces for select.order=rlt_reward (the trace in
    fields.explanation, e.g. completion; the reference in fields.solution, e.g. answer); omit
    when the records already carry rlt_reward (from `rlt score`)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/curate"))
    """Run directory: kept.jsonl, dropped.jsonl, funnel.json, config, manifest."""

    def __post_init__(self):
        check_given(self.student_samples, "student_samples", "the student's samples, or null")


def default_backend_factory(rewrite: RewriteConfig) -> Backend:
    from potstill.teacher.factory import make_backend

    return make_backend(rewrite.model, rewrite.backend, batch_size=rewrite.batch_size)


def run_curate(
    cfg: CurateConfig,
    console: Console | None = None,
    backend_factory: Callable[[RewriteConfig], Backend] | None = None,
) -> Funnel:
    """Read the samples, curate them, write kept/dropped/funnel into `cfg.run.output_dir`.

    `backend_factory` builds the rewriting model's backend (default: the configured engine); it
    is called only when rewrite is enabled and some trace still needs rewriting.
    """
    console = console or Console(stderr=True)
    # Check every input before the run directory exists: bad input must leave nothing behind.
    records = read_records(cfg.data.source, limit=cfg.data.limit)
    require_completions(records, cfg.data.source)
    student_rates = None
    if cfg.student_samples:
        student_rates = read_student_rates(cfg.student_samples, cfg.verify.threshold)
    prompt = _rewrite_prompt(cfg.rewrite) if cfg.rewrite.enabled else None
    scoring = _rlt_scoring(cfg, records)
    inputs = [cfg.data.source, *([cfg.student_samples] if cfg.student_samples else [])]
    console.print(f"[bold]{len(records)}[/] samples from {cfg.data.source}")

    with RunDir(cfg.run.output_dir, command="curate", config=cfg, inputs=inputs) as run:
        rewriter = None
        if prompt is not None:
            factory = backend_factory or default_backend_factory
            shard_dir = run.path / "rewrite"

            def rewriter(kept: list[dict]) -> list[dict]:
                rw = cfg.rewrite
                sampling = Sampling(
                    max_new_tokens=rw.max_new_tokens, temperature=rw.temperature, top_p=rw.top_p
                )
                if not pending_rewrites(kept, shard_dir):  # resumed: no model to load
                    return rewrite_traces(kept, None, prompt=prompt, shard_dir=shard_dir)
                with factory(rw) as backend, run.timed("rewrite"):
                    return rewrite_traces(
                        kept,
                        backend,
                        prompt=prompt,
                        shard_dir=shard_dir,
                        sampling=sampling,
                        seed=rw.seed,
                        threshold=cfg.verify.threshold,
                    )

        def scorer(kept: list[dict]) -> list[dict]:
            with run.timed("rlt_score"):
                scored = score_with(scoring, kept, cfg.data.source, console)
            # Too long to score is not a reason to drop a verified trace: it ranks last instead.
            return [_skip_note(r) for r in scored]

        with run.timed("curate"):
            kept, dropped, funnel = curate_records(
                records, cfg, student_rates=student_rates, rewriter=rewriter,
                scorer=scorer if scoring is not None else None,
            )  # fmt: skip
        write_records(run.path / "kept.jsonl", kept)
        write_records(run.path / "dropped.jsonl", dropped)
        atomic_write_text(run.path / "funnel.json", json.dumps(funnel.to_dict(), indent=2) + "\n")
        run.count(
            input_records=funnel.input_records,
            input_questions=funnel.input_questions,
            kept_records=len(kept),
            kept_questions=funnel.kept_questions,
            dropped_records=len(dropped),
        )
    console.print(funnel.table())
    console.print(f"kept → {run.path / 'kept.jsonl'}   dropped → {run.path / 'dropped.jsonl'}")
    return funnel


def _skip_note(record: dict) -> dict:
    if "drop_reason" not in record:
        return record
    record = dict(record)
    record["rlt_skipped"] = record.pop("drop_reason")
    return record


def _rlt_scoring(cfg: CurateConfig, records: list[dict]) -> RLTScoring | None:
    """The scoring section select.order=rlt_reward needs (None: not asked, or the records
    carry rlt_reward already); refused up front when it is needed and missing."""
    if cfg.select.order != "rlt_reward":
        return None
    if all(isinstance(r.get("rlt_reward"), int | float) for r in records):
        return None
    if cfg.rlt is None:
        raise ConfigError(
            "select.order=rlt_reward: the records carry no rlt_reward; score them first with "
            "`potstill rlt score`, or give the rlt section (rlt.teacher.name, rlt.student.name, "
            "rlt.fields.explanation=completion) so curate scores them"
        )
    check_fields(records, cfg.data.source, cfg.rlt.fields)  # before the run directory exists
    return cfg.rlt


def _rewrite_prompt(rewrite: RewriteConfig) -> str:
    from potstill.prompts import load_prompt

    try:
        return load_prompt(rewrite.prompt_file)
    except ConfigError as exc:
        raise ConfigError(f"rewrite.prompt_file: {exc}") from None
