"""`potstill quickstart`: the whole chain, offline, on the kit's real models.

    potstill quickstart [--config configs/quickstart.yaml] [--set run.output_dir=runs/q2 ...]

student baseline eval (and the teacher's) → teacher generation → curation → student fine-tuning →
eval → report. Each stage is the stage command's own function on its own run directory under
`run.output_dir`, so a killed quickstart, rerun, picks up inside the stage it was in. The training
and evaluation questions come from different seeds, and a training question whose text also appears
among the evaluation questions is dropped before the teacher sees it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console

from potstill.config import check
from potstill.config.sections import (
    MIN_TEMPERATURE,
    SOURCE,
    DataConfig,
    GenerationConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    SFTDataConfig,
    TrainConfig,
    check_given,
)
from potstill.curate.pipeline import DedupConfig, FormatConfig, SelectConfig
from potstill.data import read_records, write_records
from potstill.errors import DataError
from potstill.eval.config import CostConfig, EvalTask, HeldOutSet, eval_model
from potstill.eval.results import answers_dir, slug
from potstill.eval.tasks import normal_question
from potstill.runs import RunDir
from potstill.stages.curate import CurateConfig, run_curate
from potstill.stages.eval import EvalConfig, run_eval
from potstill.stages.quickstart_table import print_summary, summarise
from potstill.stages.sft import SFTConfig, run_sft

TASK = "rg:basic_arithmetic?min_terms=2&max_terms=4&min_digits=1&max_digits=2"
PRODUCTS = "rg:products?min_terms=2&max_terms=2&min_digits=1&max_digits=2"
MIX = f"{TASK}&size=48&seed=1 + {PRODUCTS}&size=32&seed=100000"
"""The training mixture: two arithmetic families, sums and differences of 2-4 terms (48) and
two-factor products (32) — the operation the single-family quickstart never practised."""
HELD_OUT = f"{TASK}&size=40&seed=10000 + {PRODUCTS}&size=20&seed=134000"


TRANSFER = (
    HeldOutSet("reworded", f"{TASK}&size=20&seed=40000&phrasing=wording", "rephrased"),
    HeldOutSet(  # three terms at most: spelt out, four make a sentence few models parse
        "in_words",
        "rg:basic_arithmetic?min_terms=2&max_terms=3&min_digits=1&max_digits=2&size=20&seed=50000"
        "&phrasing=words",
        "rephrased",
    ),
    HeldOutSet(
        "chain_sum",
        "rg:chain_sum?size=20&seed=20000&min_terms=2&max_terms=4&min_digits=1&max_digits=2",
        "other_family",
    ),
    HeldOutSet(
        "decimal_chain_sum",
        "rg:decimal_chain_sum?size=20&seed=70000&min_terms=2&max_terms=3&max_digits=2"
        "&max_decimal_places=1",
        "other_family",
    ),
)
"""The default transfer sets: the same problems reworded and in words (potstill.data.rephrase),
and two families never trained on that need the same skill: integer chains written as
chain_sum writes them, and sums of one-decimal numbers."""


@dataclass
class QuickstartData:
    train: str = MIX
    """Questions the teacher answers and the student learns from."""
    eval: str = HELD_OUT
    """Held-out questions for every model. reasoning-gym draws item i from seed + i, so seeds
    closer than the sizes share questions: keep them far apart (shared ones leave training)."""
    task_name: str = "arithmetic"
    """Name of the task in tables and the report."""
    transfer: list[HeldOutSet] = field(default_factory=lambda: list(TRANSFER))
    """More held-out sets the student answers before and after, reported apart from the trained
    task: the same problems phrased otherwise (kind rephrased), task families never trained on
    (kind other_family). Training questions whose text appears in one are dropped."""

    def __post_init__(self):
        check_given(self.train, "train", SOURCE)
        check_given(self.eval, "eval", SOURCE)
        names = [self.task_name, *(t.name for t in self.transfer)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        shown = repr(dupes[0]) if dupes else ""
        check(
            not dupes,
            f"transfer: set names must differ from each other and from task_name, {shown} repeats",
        )


@dataclass
class QuickstartConfig:
    """The main job: teacher traces → curated → student fine-tuned → evaluated before and after,
    with cost, in one HTML report. Offline on CPU with the kit's real models."""

    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(name="qwen2.5-coder-1.5b-instruct")
    )
    """The teacher: writes the traces (sequence-level distillation needs no shared tokenizer)."""
    student: ModelConfig = field(default_factory=lambda: ModelConfig(lora=LoraConfig()))
    """The student, fine-tuned with LoRA (or fully: lora: null)."""
    data: QuickstartData = field(default_factory=QuickstartData)
    """Training and held-out questions."""
    decoding: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(
            max_new_tokens=96, batch_size=32, system_prompt="arithmetic_steps"
        )
    )
    """How every model answers in the evals (teacher, student before and after: the same)."""
    teacher_samples: int = 1
    """Teacher samples per training question (more than 1 samples at teacher_temperature)."""
    teacher_temperature: float = 0.0
    """Sampling temperature of the teacher's traces when teacher_samples > 1."""
    keep_per_question: int = 1
    """Verified traces kept per question (the shortest first)."""
    eval_teacher: bool = False
    """Also evaluate the teacher on the held-out questions. Off: its accuracy and cost come from
    the training questions it answers anyway (same distribution, never trained on), which
    saves the slowest model a second pass on CPU."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            lr=2e-4, epochs=3, micro_batch_size=4, grad_accum=2, max_seq_len=256,
            warmup_ratio=0.1, save_every=5,
        )
    )  # fmt: skip
    """Fine-tuning of the student on the kept traces."""
    cost: CostConfig = field(default_factory=CostConfig)
    """Hardware price, to turn measured time into $ per 1,000 answers and $ per training run."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/quickstart"))

    def __post_init__(self):
        check(self.teacher_samples > 0, f"teacher_samples: must be > 0, got {self.teacher_samples}")
        check(
            self.keep_per_question > 0,
            f"keep_per_question: must be > 0, got {self.keep_per_question}",
        )
        # Checked here, not only when the generate stage builds its sampling section from it:
        # that is after the first eval has run.
        check(
            self.teacher_temperature == 0 or self.teacher_temperature >= MIN_TEMPERATURE,
            f"teacher_temperature: must be 0 (greedy) or >= {MIN_TEMPERATURE}, got "
            f"{self.teacher_temperature}",
        )


STAGES = ("eval-before", "generate", "curate", "sft", "eval-after")


def run_quickstart(cfg: QuickstartConfig, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    out = Path(cfg.run.output_dir)
    from potstill.models import resolve_model_path

    # Bad input fails here, before the run directory exists.
    train_records = read_records(cfg.data.train)
    eval_records = read_records(cfg.data.eval)
    transfer = {t.name: read_records(t.source) for t in cfg.data.transfer}
    for model in (cfg.student, cfg.teacher):
        resolve_model_path(model.name)  # prepares a kit model on first use
    sources = [cfg.data.train, cfg.data.eval, *(t.source for t in cfg.data.transfer)]
    with RunDir(out, command="quickstart", config=cfg, inputs=sources) as run:
        train_path, eval_path = _write_split(
            run.path, train_records, eval_records, transfer, console
        )
        started = time.perf_counter()
        for i, stage in enumerate(STAGES, 1):
            console.rule(f"[bold]{i}/{len(STAGES) + 1} {stage}")
            with run.timed(stage):
                STAGE_FUNCTIONS[stage](cfg, run.path, train_path, eval_path, console)
        kinds = {t.name: t.kind for t in cfg.data.transfer}
        summary = summarise(run.path, cfg.data.task_name, kinds)
        run.count(**{k: v for k, v in summary.items() if isinstance(v, int | float)})
        run.manifest["timings"]["this_attempt"] = round(time.perf_counter() - started, 1)
    # The report comes last, once the quickstart's own run is complete (it reports on it).
    console.rule(f"[bold]{len(STAGES) + 1}/{len(STAGES) + 1} report")
    from potstill.report import write_report

    html = write_report([out], out / "report.html", price_per_hour=cfg.cost.usd_per_hour)
    print_summary(summary, html, console)
    return summary


def _write_split(
    path: Path, train: list[dict], held_out: list[dict], transfer: dict[str, list[dict]], console
) -> tuple[str, str]:
    """Held-out questions as drawn; training questions minus any whose text is held out (in the
    trained task's set or a transfer set)."""
    every_held = [*held_out, *(r for records in transfer.values() for r in records)]
    held = {normal_question(r["question"]) for r in every_held}
    kept = [r for r in train if normal_question(r["question"]) not in held]
    if not kept:
        raise DataError("data.train: every training question is also held out; use another seed")
    if len(kept) < len(train):
        console.print(
            f"[yellow]dropped {len(train) - len(kept)} training questions that are also held "
            "out[/] (reasoning-gym item i comes from seed + i: keep the two seeds far apart)"
        )
    train_path, eval_path = path / "data" / "train.jsonl", path / "data" / "eval.jsonl"
    write_records(train_path, kept)
    write_records(eval_path, held_out)
    for name, records in transfer.items():
        write_records(transfer_path(path, name), records)
    return str(train_path), str(eval_path)


def transfer_path(path: Path, name: str) -> Path:
    return path / "data" / f"transfer-{slug(name)}.jsonl"


def _eval_config(
    cfg, out: Path, questions: str, exclude: str | None, models, *, transfer: bool = True
) -> EvalConfig:
    """The eval of `questions` (the trained task's) and, with `transfer`, of the transfer sets
    (not in the teacher's pass over the training questions)."""
    tasks = [EvalTask(source=questions, name=cfg.data.task_name)]
    if transfer:
        tasks += [
            EvalTask(source=str(transfer_path(out.parent, t.name)), name=t.name)
            for t in cfg.data.transfer
        ]
    return EvalConfig(
        models=models,
        tasks=tasks,
        exclude=[exclude] if exclude else [],
        generation=cfg.decoding,
        cost=cfg.cost,
        run=RunConfig(output_dir=str(out), log_with=cfg.run.log_with),
    )


def eval_before(cfg, path: Path, train_path: str, eval_path: str, console) -> None:
    models = [eval_model(cfg.student, "student (before)", "student")]
    if cfg.eval_teacher:
        models.insert(0, eval_model(cfg.teacher, "teacher", "teacher"))
    run_eval(_eval_config(cfg, path / "eval-before", eval_path, train_path, models), console)


def generate(cfg, path: Path, train_path: str, eval_path: str, console) -> None:
    """The teacher answers the training questions with the eval's decoding: its answers are the
    traces to curate, and, verified, its accuracy and cost (it never trains on these questions,
    so they measure it as well as held-out ones would, at no extra generation)."""
    teacher = eval_model(cfg.teacher, "teacher", "teacher")
    gen = replace(
        cfg.decoding,
        num_samples=cfg.teacher_samples,
        temperature=cfg.teacher_temperature if cfg.teacher_samples > 1 else 0.0,
    )
    eval_cfg = _eval_config(cfg, path / "generate", train_path, None, [teacher], transfer=False)
    run_eval(replace(eval_cfg, generation=gen), console)


def traces_dir(cfg, path: Path) -> Path:
    return answers_dir(path / "generate", "teacher", cfg.data.task_name)


def curate(cfg, path: Path, train_path: str, eval_path: str, console) -> None:
    run_curate(
        CurateConfig(
            data=DataConfig(source=str(traces_dir(cfg, path))),
            format=FormatConfig(drop_truncated=True, tags=[]),
            dedup=DedupConfig(exact=True, near=False),
            select=SelectConfig(k=cfg.keep_per_question, order="shortest"),
            run=RunConfig(output_dir=str(path / "curate"), log_with=cfg.run.log_with),
        ),
        console,
    )
    if not (path / "curate" / "kept.jsonl").read_text().strip():
        raise DataError(
            f"{path / 'curate' / 'funnel.json'}: the teacher got no training question right, so "
            "there is nothing to fine-tune on; use a stronger teacher or an easier task"
        )


def sft(cfg, path: Path, train_path: str, eval_path: str, console) -> None:
    run_sft(
        SFTConfig(
            model=cfg.student,
            data=SFTDataConfig(
                source=str(path / "curate" / "kept.jsonl"),
                system_prompt=cfg.decoding.system_prompt,
            ),
            train=cfg.train,
            run=RunConfig(output_dir=str(path / "sft"), log_with=cfg.run.log_with),
        ),
        console,
    )


def eval_after(cfg, path: Path, train_path: str, eval_path: str, console) -> None:
    final = str(path / "sft" / "final")
    models = [eval_model(cfg.student, "student (after)", "student", name=final)]
    kept = str(path / "curate" / "kept.jsonl")
    run_eval(_eval_config(cfg, path / "eval-after", eval_path, kept, models), console)


STAGE_FUNCTIONS = {
    "eval-before": eval_before,
    "generate": generate,
    "curate": curate,
    "sft": sft,
    "eval-after": eval_after,
}
