"""`potstill quickstart`: the whole chain, offline, on the kit's real models.

    potstill quickstart [--config configs/quickstart.yaml] [--set run.output_dir=runs/q2 ...]

student baseline eval (and the teacher's) → teacher generation → curation → student fine-tuning →
eval → report. Each stage is the stage command's own function on its own run directory under
`run.output_dir`, so a killed quickstart, rerun, picks up inside the stage it was in. The training
and evaluation questions come from different seeds, and a training question whose text also appears
among the evaluation questions is dropped before the teacher sees it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

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
from potstill.eval.config import CostConfig, EvalTask, eval_model
from potstill.eval.results import answers_dir
from potstill.eval.tasks import normal_question
from potstill.runs import RunDir
from potstill.stages.curate import CurateConfig, run_curate
from potstill.stages.eval import EvalConfig, run_eval
from potstill.stages.sft import SFTConfig, run_sft

TASK = "rg:basic_arithmetic?min_terms=2&max_terms=4&min_digits=1&max_digits=2"


@dataclass
class QuickstartData:
    train: str = f"{TASK}&size=80&seed=1"
    """Questions the teacher answers and the student learns from."""
    eval: str = f"{TASK}&size=60&seed=10000"
    """Held-out questions for every model. reasoning-gym draws item i from seed + i, so seeds
    closer than the sizes share questions: keep them far apart (shared ones leave training)."""
    task_name: str = "basic_arithmetic"
    """Name of the task in tables and the report."""

    def __post_init__(self):
        check_given(self.train, "train", SOURCE)
        check_given(self.eval, "eval", SOURCE)


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
    for model in (cfg.student, cfg.teacher):
        resolve_model_path(model.name)  # prepares a kit model on first use
    with RunDir(
        out, command="quickstart", config=cfg, inputs=[cfg.data.train, cfg.data.eval]
    ) as run:
        train_path, eval_path = _write_split(run.path, train_records, eval_records, console)
        started = time.perf_counter()
        for i, stage in enumerate(STAGES, 1):
            console.rule(f"[bold]{i}/{len(STAGES) + 1} {stage}")
            with run.timed(stage):
                STAGE_FUNCTIONS[stage](cfg, run.path, train_path, eval_path, console)
        summary = summarise(run.path)
        run.count(**{k: v for k, v in summary.items() if isinstance(v, int | float)})
        run.manifest["timings"]["this_attempt"] = round(time.perf_counter() - started, 1)
    # The report comes last, once the quickstart's own run is complete (it reports on it).
    console.rule(f"[bold]{len(STAGES) + 1}/{len(STAGES) + 1} report")
    from potstill.report import write_report

    html = write_report([out], out / "report.html", price_per_hour=cfg.cost.usd_per_hour)
    print_summary(summary, html, console)
    return summary


def _write_split(path: Path, train: list[dict], held_out: list[dict], console) -> tuple[str, str]:
    """Held-out questions as drawn; training questions minus any whose text is held out."""
    held = {normal_question(r["question"]) for r in held_out}
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
    return str(train_path), str(eval_path)


def _eval_config(cfg, out: Path, questions: str, exclude: str | None, models) -> EvalConfig:
    return EvalConfig(
        models=models,
        tasks=[EvalTask(source=questions, name=cfg.data.task_name)],
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
    eval_cfg = _eval_config(cfg, path / "generate", train_path, None, [teacher])
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


def _questions(stage: str) -> str:
    return "train" if stage == "generate" else "held-out"


STAGE_FUNCTIONS = {
    "eval-before": eval_before,
    "generate": generate,
    "curate": curate,
    "sft": sft,
    "eval-after": eval_after,
}


def summarise(path: Path) -> dict:
    """The rows of the final table (teacher, student before, student after) and the headline."""
    rows = {}
    for stage in ("generate", "eval-before", "eval-after"):  # a held-out teacher row wins
        result = json.loads((path / stage / "eval.json").read_text())
        costs = {m["label"]: m for m in result["models"]}
        for r in result["results"]:
            rows[r["model"]] = {**costs[r["model"]], **r, "questions": _questions(stage)}
    sft_manifest = json.loads((path / "sft" / "manifest.json").read_text())
    kept = len(read_records(path / "curate" / "kept.jsonl"))
    before, after = rows["student (before)"], rows["student (after)"]
    summary = {
        "rows": rows,
        "kept_traces": kept,
        "train_seconds": round(sft_manifest["timings"].get("train", 0.0), 1),
        "student_before_accuracy": before["accuracy"],
        "student_after_accuracy": after["accuracy"],
        "gain_points": round(100 * (after["accuracy"] - before["accuracy"]), 1),
    }
    if "teacher" in rows:
        teacher = rows["teacher"]
        summary["teacher_accuracy"] = teacher["accuracy"]
        if teacher["accuracy"] > 0:
            summary["kept_of_teacher"] = round(after["accuracy"] / teacher["accuracy"], 3)
        if after["usd_per_1k_answers"] > 0:
            summary["cost_ratio"] = round(
                teacher["usd_per_1k_answers"] / after["usd_per_1k_answers"], 2
            )
    return summary


def print_summary(summary: dict, report_path: Path, console: Console) -> None:
    from rich import box

    table = Table(
        title="teacher → student (same decoding for every model)",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
        show_edge=False,
        caption="tok/ans: tokens per answer; s/ans: seconds per answer (batched); "
        "$/1k: per 1,000 answers",
    )
    for col in ("model", "questions", "accuracy", "params", "tok/ans", "s/ans", "$/1k"):
        table.add_column(col, justify="left" if col in ("model", "questions") else "right",
                         no_wrap=True)  # fmt: skip
    for label, r in summary["rows"].items():
        table.add_row(
            label,
            f"{r['n']} {r['questions']}",
            f"{r['accuracy']:.1%} ({r['correct']}/{r['n']})",
            f"{r['params'] / 1e9:.2f}B" if r.get("params") else "-",
            f"{r['mean_completion_tokens']:.0f}",
            f"{r['seconds_per_answer']:.2f}",
            f"{r['usd_per_1k_answers']:.4f}",
        )
    console.print(table)
    if any(r["questions"] == "train" for r in summary["rows"].values()):
        console.print(
            "[dim]train: the teacher's accuracy on the training questions it answered (it never "
            "learns from them); held-out: questions no model trained on[/]"
        )
    line = (
        f"student: {summary['student_before_accuracy']:.1%} → "
        f"{summary['student_after_accuracy']:.1%} ({summary['gain_points']:+.1f} points) "
        f"after fine-tuning on {summary['kept_traces']} verified teacher traces"
    )
    if "kept_of_teacher" in summary:
        line += (
            f"; it keeps {summary['kept_of_teacher']:.0%} of the teacher's accuracy"
            + (f" at 1/{summary['cost_ratio']:.1f} of its cost per answer"
               if "cost_ratio" in summary else "")
        )  # fmt: skip
    console.print(line)
    console.print(f"report: {report_path}")
