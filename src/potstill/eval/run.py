"""`potstill eval`: models × tasks → accuracy with the tasks' own verifiers, and what each model
costs to answer.

    potstill eval --config configs/eval.yaml
    potstill eval --config configs/eval.yaml --shard 1/4    # questions split by id over 4 jobs
    potstill eval --config configs/eval.yaml --merge        # once all 4 finished

Each (model, task) writes its answers as resumable shards under `answers/`; a killed eval, rerun,
answers only what is missing. `eval.json` holds every model's cost and every (model, task) result.
A shard (`potstill.data.sharding`) answers its questions in `shards/I-of-N/`; `eval/merge.py`
joins them.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

from potstill.config import check
from potstill.curate.verifiers import check_gold, find_answer, verify
from potstill.data import ShardWriter, read_records, read_shards
from potstill.data.sharding import Shard, shard_run_dir
from potstill.errors import ConfigError
from potstill.eval.bench import score_samples
from potstill.eval.cost import (
    MemoryMeter,
    SpeedMeter,
    cost_summary,
    hardware_name,
    release_memory,
    weight_bytes,
)
from potstill.fsutil import atomic_write_text
from potstill.models import resolve_model_path
from potstill.prompts import load_prompt
from potstill.runs import RunDir
from potstill.sections import BackendConfig, GenerationConfig, ModelConfig, RunConfig
from potstill.teacher.generate import (
    build_requests,
    generate_into,
    generation_progress,
    provenance_of,
    sampling_of,
)


@dataclass
class EvalModel:
    name: str = "qwen2.5-coder-0.5b-instruct"
    """Kit name, model directory (a fine-tuned student's `final/`, adapter or merged), or hub id."""
    label: str | None = None
    """Name in tables and plots (default: name). Unique within the eval."""
    role: Literal["teacher", "student"] = "student"
    """Teacher or student: the report contrasts them."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: auto = bf16 on a GPU that supports it, float32 on CPU."""
    device: str = "auto"
    """cpu, cuda, cuda:1, or auto."""
    trust_remote_code: bool = False
    """Run custom model code from the model's repository. Off unless you reviewed that code."""

    def __post_init__(self):
        check(bool(self.name.strip()), "name: empty; give a kit name, a directory or a hub id")
        self.label = self.label or self.name

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            name=self.name,
            dtype=self.dtype,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
        )


@dataclass
class EvalTask:
    source: str = "rg:basic_arithmetic?size=40&seed=1001&max_terms=3&max_digits=2"
    """Questions with answers: .jsonl, .parquet, a directory, or rg:TASK?size=N&seed=S."""
    name: str | None = None
    """Name in tables and plots (default: the reasoning-gym task or the file's stem)."""
    limit: int | None = None
    """Use only the first N questions."""

    def __post_init__(self):
        check(self.limit is None or self.limit > 0, f"limit: must be > 0, got {self.limit}")
        self.name = self.name or _task_name(self.source)


@dataclass
class CostConfig:
    usd_per_hour: float = 0.10
    """Price of the hardware the eval runs on, $ per hour (a cloud 2-vCPU VM is ~$0.10, an H100
    ~$2-4): turns measured seconds per answer into $ per 1,000 answers."""
    hardware: str | None = None
    """What that hardware is, for the report (default: detected, e.g. "2-core CPU (x86_64)")."""
    latency_samples: int = 2
    """Questions each model also answers alone (batch of one) to time the latency one user
    sees; 0 skips it."""

    def __post_init__(self):
        check(self.usd_per_hour >= 0, f"usd_per_hour: must be >= 0, got {self.usd_per_hour}")
        check(
            self.latency_samples >= 0,
            f"latency_samples: must be >= 0, got {self.latency_samples}",
        )


@dataclass
class EvalConfig:
    """Accuracy of models on tasks with the tasks' own verifiers, and the cost of each model."""

    models: list[EvalModel] = field(default_factory=lambda: [EvalModel()])
    """The models to evaluate, each with a label and role."""
    tasks: list[EvalTask] = field(default_factory=lambda: [EvalTask()])
    """Held-out question sets."""
    exclude: list[str] = field(default_factory=list)
    """Training record sources (e.g. curated traces): the eval refuses to run if any of its
    questions (by id or by text) is among them."""
    ks: list[int] = field(default_factory=lambda: [1])
    """k values for pass@k and maj@k (each needs generation.num_samples >= k)."""
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(
            max_new_tokens=256, batch_size=16, system_prompt="step_by_step"
        )
    )
    backend: BackendConfig = field(default_factory=BackendConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/eval"))

    def __post_init__(self):
        check(bool(self.models), "models: empty; list at least one model to evaluate")
        check(bool(self.tasks), "tasks: empty; list at least one task (a record source)")
        for key, items in (
            ("models", [m.label for m in self.models]),
            ("tasks", [t.name for t in self.tasks]),
        ):
            dupes = sorted({x for x in items if items.count(x) > 1})
            check(
                not dupes,
                f"{key}: names must be unique, '{dupes[0] if dupes else ''}' repeats; "
                "give each a distinct label/name",
            )
        check(all(k >= 1 for k in self.ks), f"ks: every k must be >= 1, got {self.ks}")
        bad = [k for k in self.ks if k > self.generation.num_samples]
        check(
            not bad,
            f"ks: {bad[0] if bad else ''} needs at least that many samples per question; raise "
            f"generation.num_samples (now {self.generation.num_samples}) or drop it",
        )


def _task_name(source: str) -> str:
    if source.startswith("rg:"):
        return source[3:].partition("?")[0]
    return Path(source.partition("?")[0]).stem or source


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def load_tasks(cfg: EvalConfig) -> dict[str, list[dict]]:
    """Every task's records, checked: non-empty, gold answers verifiable, none seen in training."""
    tasks = {}
    for task in cfg.tasks:
        records = read_records(task.source, limit=task.limit)
        if not records:
            raise ConfigError(f"tasks: {task.source} holds no records; an eval needs questions")
        check_gold(records, task.source)
        tasks[task.name] = records
    check_no_overlap(tasks, cfg.exclude)
    return tasks


def check_no_overlap(tasks: dict[str, list[dict]], exclude: list[str]) -> None:
    """Refuse an eval whose questions appear (by id or normalised text) in training data."""
    for source in exclude:
        seen = read_records(source)
        ids = {r.get("source_id", r["id"]) for r in seen} | {r["id"].split("#")[0] for r in seen}
        texts = {normal_question(r["question"]) for r in seen}
        for name, records in tasks.items():
            hits = [r for r in records if r["id"] in ids or normal_question(r["question"]) in texts]
            if hits:
                raise ConfigError(
                    f"exclude: {len(hits)} of {len(records)} questions of task '{name}' are in "
                    f"the training data {source} (first: '{hits[0]['id']}'); evaluate on "
                    "held-out questions (another seed, or another split)"
                )


def normal_question(text: str) -> str:
    """Question text compared case- and whitespace-insensitively (held-out checks)."""
    return " ".join(text.lower().split())


def run_eval(
    cfg: EvalConfig, console: Console | None = None, *, shard: Shard | None = None, merge=False
) -> dict:
    """Answer and score every (model, task); a `shard` answers only its questions, in its own
    run directory; `merge` joins finished shards instead (see eval/merge.py)."""
    from potstill.eval.merge import import_shard_answers, merge_eval

    console = console or Console(stderr=True)
    if shard is not None and merge:
        raise ConfigError("--shard and --merge: merge runs once, after every shard; drop --shard")
    tasks = load_tasks(cfg)
    if merge:
        return merge_eval(cfg, tasks, console)
    out = cfg.run.output_dir
    if shard is not None:
        selected = {name: shard.select(records) for name, records in tasks.items()}
        sizes = ", ".join(f"{name} {len(records)}" for name, records in selected.items())
        console.print(f"shard {shard}: questions {sizes} (split by id)")
        tasks = {name: records for name, records in selected.items() if records}
        out = shard_run_dir(out, shard)
    system_prompt = (
        load_prompt(cfg.generation.system_prompt) if cfg.generation.system_prompt else None
    )
    if cfg.backend.kind != "openai":
        for model in cfg.models:
            resolve_model_path(model.name)  # an unknown model fails here, before any work
    inputs = [t.source for t in cfg.tasks] + list(cfg.exclude)
    with RunDir(out, command="eval", config=cfg, inputs=inputs) as run:
        if shard is None:  # answers finished by shards of this output_dir are not redone
            import_shard_answers(cfg, run.path, tasks, console)
        costs = {}
        for model in cfg.models:
            if tasks:  # a shard may hold none of the questions: then no model is loaded
                costs[model.label] = _eval_model(cfg, run, model, tasks, system_prompt, console)
        report = _collect(cfg, run, costs, tasks)
        if shard is not None:
            report["shard"] = str(shard)  # this shard's questions only
        atomic_write_text(run.path / "eval.json", json.dumps(report, indent=2) + "\n")
        run.count(results=len(report["results"]))
    print_results(report, console)
    return report


def answers_dir(run_path: Path, label: str, task: str) -> Path:
    return run_path / "answers" / slug(label) / slug(task)


def _eval_model(cfg, run, model: EvalModel, tasks, system_prompt, console) -> dict:
    """Answer every task's missing questions with one model; its cost, measured (or kept from
    the attempt that measured it, when nothing was left to answer)."""
    cost_path = run.path / "cost" / f"{slug(model.label)}.json"
    gen = cfg.generation
    todo = {}
    for name, records in tasks.items():
        pairs = build_requests(records, gen, system_prompt)
        done = {r["id"] for r in read_shards(answers_dir(run.path, model.label, name))}
        todo[name] = [(req, rec) for req, rec in pairs if req.key not in done]
    if not any(todo.values()) and cost_path.is_file():
        return json.loads(cost_path.read_text())
    from potstill.teacher.factory import make_backend

    speed = SpeedMeter()
    with MemoryMeter() as memory:
        t0 = time.perf_counter()
        backend = make_backend(model.model_config(), cfg.backend, batch_size=gen.batch_size)
        load_seconds = time.perf_counter() - t0
        memory.reset_peak()
        provenance = provenance_of(backend, model.name, gen)
        for name, pairs in todo.items():
            if pairs:
                _answer(
                    backend, pairs, gen, run.path, model.label, name, provenance, speed, console
                )
        latency = _latency(backend, tasks, gen, system_prompt, cfg.cost.latency_samples)
        hf_model = getattr(backend, "model", None)
        params = sum(p.numel() for p in hf_model.parameters()) if hf_model is not None else None
        backend.close()
        del backend, hf_model
        release_memory()
    disk = weight_bytes(resolve_model_path(model.name)) if cfg.backend.kind != "openai" else None
    cost = {
        "name": model.name,
        "role": model.role,
        **cost_summary(
            params=params,
            disk_bytes=disk,
            peak_memory_bytes=memory.peak_bytes,
            speed=speed,
            usd_per_hour=cfg.cost.usd_per_hour,
            load_seconds=load_seconds,
            latency_s=latency,
        ),
    }
    cost_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cost_path, json.dumps(cost, indent=2) + "\n")
    return cost


def _latency(backend, tasks, gen, system_prompt, samples: int) -> float | None:
    """Mean seconds to answer one question alone (batch of one), over the first few questions."""
    records = next(iter(tasks.values()))[:samples]
    if not records:
        return None
    pairs = build_requests(records, replace(gen, num_samples=1), system_prompt)
    seconds = []
    for request, _ in pairs:
        start = time.perf_counter()
        for _ in backend.generate([request], sampling_of(gen)):
            pass
        seconds.append(time.perf_counter() - start)
    return sum(seconds) / len(seconds)


def _answer(backend, pairs, gen, run_path, label, task, provenance, speed, console) -> None:
    def scored(record: dict) -> dict:
        answer = find_answer(record["completion"])
        return {
            **record,
            "sample": int(record["id"].rsplit("#", 1)[1]),
            "answer_given": answer,
            "verified": verify(record, record["completion"]) >= 1.0,
        }

    with (
        ShardWriter(answers_dir(run_path, label, task), shard_size=gen.batch_size) as writer,
        generation_progress(console) as progress,
    ):
        bar = progress.add_task(f"{label} · {task}", total=len(pairs), speed="")

        def on_result(out) -> None:
            speed.record(out.completion_tokens)
            rate = speed.tokens / max(speed.elapsed(), 1e-9)
            progress.update(bar, advance=1, speed=f"{rate:.1f} tok/s")

        speed.start()
        try:
            generate_into(
                backend,
                pairs,
                sampling_of(gen),
                writer,
                provenance,
                on_result=on_result,
                transform=scored,
            )
        finally:
            speed.stop()


def _collect(cfg: EvalConfig, run, costs: dict, tasks: dict) -> dict:
    results = []
    for model in cfg.models:
        for name in tasks:
            samples = list(read_shards(answers_dir(run.path, model.label, name)))
            results.append({"model": model.label, "task": name, **score_samples(samples, cfg.ks)})
    return {
        "price": {
            "usd_per_hour": cfg.cost.usd_per_hour,
            "hardware": cfg.cost.hardware or hardware_name(),
        },
        "generation": {
            "max_new_tokens": cfg.generation.max_new_tokens,
            "temperature": cfg.generation.temperature,
            "num_samples": cfg.generation.num_samples,
            "system_prompt": cfg.generation.system_prompt,
        },
        "models": [{"label": m.label, **costs.get(m.label, {})} for m in cfg.models],
        "results": results,
    }


def print_results(report: dict, console: Console) -> None:
    costs = {m["label"]: m for m in report["models"]}
    table = Table(title="eval")
    for col in ("model", "task", "accuracy", "correct", "tok/s", "s/answer", "$/1k answers"):
        table.add_column(col, justify="left" if col in ("model", "task") else "right")
    for r in report["results"]:
        c = costs[r["model"]]
        extra = "".join(f"  pass@{k} {v:.0%}" for k, v in r["pass@k"].items() if k != "1")
        table.add_row(
            r["model"],
            r["task"],
            f"{r['accuracy']:.1%}{extra}",
            f"{r['correct']}/{r['n']}",
            f"{c['tokens_per_s']:.1f}",
            f"{c['seconds_per_answer']:.2f}",
            f"{c['usd_per_1k_answers']:.4f}",
        )
    console.print(table)
