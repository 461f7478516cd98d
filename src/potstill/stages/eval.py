"""`potstill eval`: models × tasks → accuracy with the tasks' own verifiers, and what each model
costs to answer.

    potstill eval --config configs/eval.yaml
    potstill eval --config configs/eval.yaml --shard 1/4    # questions split by id over 4 jobs
    potstill eval --config configs/eval.yaml --merge        # once all 4 finished
    potstill eval --config configs/eval.yaml --set engine=ray --set ray.num_workers=4

Each (model, task) writes its answers as resumable shards under `answers/`; a killed eval, rerun,
answers only what is missing. `eval.json` holds every model's cost and every (model, task) result.
A shard (`potstill.data.sharding`) answers its questions in `shards/I-of-N/`; `eval/merge.py`
joins them. With `engine: ray` a pool of Ray actors answers and this process writes the same
answer files; the cost is then the pool's (`RAY_COST`, docs/scale_out.md "On Ray").
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace

from rich.console import Console

from potstill.config import check, shown
from potstill.config.engine import Engine, RayConfig
from potstill.config.sections import BackendConfig, GenerationConfig, RunConfig, check_given
from potstill.data import ShardWriter, read_shards
from potstill.data.sharding import Shard, shard_run_dir
from potstill.data.verifiers import find_answer, verify
from potstill.errors import ConfigError, ModelError
from potstill.eval.config import CostConfig, EvalModel, EvalTask
from potstill.eval.cost import (
    MemoryMeter,
    SpeedMeter,
    cost_summary,
    release_memory,
    weight_bytes,
)
from potstill.eval.results import (
    answers_dir,
    collect_results,
    folder_clash,
    print_results,
    slug,
)
from potstill.eval.tasks import load_tasks
from potstill.fsutil import atomic_write_text
from potstill.models import resolve_model_path
from potstill.prompts import load_prompt
from potstill.runs import RunDir
from potstill.teacher.ray_pool import import_ray, write_failed
from potstill.teacher.requests import (
    build_requests,
    generate_into,
    generation_progress,
    provenance_of,
    sampling_of,
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
    engine: Engine = "local"
    """local: each model answers in this process; ray: in `ray.num_workers` Ray actors, this
    process writing their answers (the same files) and measuring the pool's cost
    (docs/scale_out.md)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """The actor pool of engine: ray."""

    def __post_init__(self):
        check(bool(self.models), "models: empty; list at least one model to evaluate")
        check(bool(self.tasks), "tasks: empty; list at least one task (a record source)")
        for key, what, items in (
            ("models", "labels", [m.label for m in self.models]),
            ("tasks", "names", [t.name for t in self.tasks]),
        ):
            dupes = sorted({x for x in items if items.count(x) > 1})
            check(
                not dupes,
                f"{key}: names must be unique, {shown(dupes[0]) if dupes else ''} repeats; "
                "give each a distinct label/name",
            )
            if clash := folder_clash(items):  # answers/<label>/<task> are named by slug
                raise ConfigError(
                    f"{key}: {what} {shown(clash[0])} and {shown(clash[1])} share the answers "
                    f"folder {shown(clash[2])}; give {what} that stay distinct as folder names "
                    "(letters, digits, '.', '_', '-'; case ignored)"
                )
        for source in self.exclude:
            check_given(source, "exclude", "a record source per entry (or drop the entry)")
        check(all(k >= 1 for k in self.ks), f"ks: every k must be >= 1, got {shown(self.ks)}")
        bad = [k for k in self.ks if k > self.generation.num_samples]
        check(
            not bad,
            f"ks: {bad[0] if bad else ''} needs at least that many samples per question; raise "
            f"generation.num_samples (now {self.generation.num_samples}) or drop it",
        )


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
    if cfg.engine == "ray":
        import_ray()  # Ray missing: one line, before the run directory is made
    inputs = [t.source for t in cfg.tasks] + list(cfg.exclude)
    # Answers are kept per model and task, so a rerun may add models or tasks to the run.
    grows = ("models", "tasks")
    with RunDir(out, command="eval", config=cfg, inputs=inputs, growable=grows) as run:
        if shard is None:  # answers finished by shards of this output_dir are not redone
            import_shard_answers(cfg, run.path, tasks, console)
        costs, failed = {}, []
        for model in cfg.models:
            if tasks:  # a shard may hold none of the questions: then no model is loaded
                with run.timed(f"eval {model.label}"):  # the manifest says where time went
                    costs[model.label] = _eval_model(
                        cfg, run, model, tasks, system_prompt, console, failed
                    )
        _check_failed(run.path, failed)
        report = collect_results(cfg, run, costs, tasks)
        if shard is not None:
            report["shard"] = str(shard)  # this shard's questions only
        atomic_write_text(run.path / "eval.json", json.dumps(report, indent=2) + "\n")
        run.count(results=len(report["results"]))
    print_results(report, console)
    return report


RAY_COST = (
    "engine: ray: speed, $/1k answers, load time and latency are measured through the pool "
    "(its {workers} actors together, Ray's transfers included); params counted in an actor; "
    "peak memory not measured (it is the actors', not this process's)"
)


def _eval_model(cfg, run, model: EvalModel, tasks, system_prompt, console, failed) -> dict:
    """Answer every task's missing questions with one model; its cost, measured (or kept from
    the attempt that measured it, when nothing was left to answer). Batches that failed every
    retry on Ray go to `failed` as (model, task, Failed)."""
    cost_path = run.path / "cost" / f"{slug(model.label)}.json"
    gen = cfg.generation
    todo = {}
    for name, records in tasks.items():
        pairs = build_requests(records, gen, system_prompt)
        done = {r["id"] for r in read_shards(answers_dir(run.path, model.label, name))}
        todo[name] = [(req, rec) for req, rec in pairs if req.key not in done]
    if not any(todo.values()) and cost_path.is_file():
        return json.loads(cost_path.read_text())
    from potstill.teacher.engines import open_backend

    speed = SpeedMeter()
    with MemoryMeter() as memory:
        t0 = time.perf_counter()
        backend = open_backend(
            model.model_config(), cfg.backend, cfg.engine, cfg.ray, batch_size=gen.batch_size
        )
        lost = getattr(backend, "failed", [])  # Ray's failed batches; the local engine has none
        try:
            load_seconds = time.perf_counter() - t0
            memory.reset_peak()
            provenance = provenance_of(backend, model.name, gen)
            for name, pairs in todo.items():
                if pairs:
                    before = len(lost)
                    _answer(
                        backend, pairs, gen, run.path, model.label, name, provenance, speed, console
                    )
                    failed += [(model.label, name, f) for f in lost[before:]]
            latency = _latency(backend, tasks, gen, system_prompt, cfg.cost.latency_samples)
            params = backend.param_count()
        finally:
            backend.close()  # a Ray pool stops its actors (and the cluster it started)
        del backend
        release_memory()
    disk = weight_bytes(resolve_model_path(model.name)) if cfg.backend.kind != "openai" else None
    peak = memory.peak_bytes
    if cfg.engine == "ray":
        console.print(RAY_COST.format(workers=cfg.ray.num_workers))
        peak = None
    cost = {
        "name": model.name,
        "role": model.role,
        **({"engine": "ray"} if cfg.engine == "ray" else {}),
        **cost_summary(
            params=params,
            disk_bytes=disk,
            peak_memory_bytes=peak,
            speed=speed,
            usd_per_hour=cfg.cost.usd_per_hour,
            load_seconds=load_seconds,
            latency_s=latency,
        ),
    }
    cost_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cost_path, json.dumps(cost, indent=2) + "\n")
    return cost


def _check_failed(run_path, failed: list) -> None:
    """List the answers that failed every retry on Ray in failed.jsonl (model, task, id, error)
    and stop before scoring: an accuracy over part of the answers would read as the whole."""
    batches = [f for _, _, f in failed]
    columns = [{"model": label, "task": task} for label, task, _ in failed]
    if count := write_failed(run_path, batches, columns):
        raise ModelError(
            f"engine: ray: {count} answers failed every retry (listed in "
            f"{run_path}/failed.jsonl); rerun to answer them, then the eval is scored"
        )


def _latency(backend, tasks, gen, system_prompt, samples: int) -> float | None:
    """Mean seconds to answer one question alone (batch of one), over the first few questions."""
    records = next(iter(tasks.values()))[:samples]
    if not records:
        return None
    pairs = build_requests(records, replace(gen, num_samples=1), system_prompt)
    seconds = []
    for request, _ in pairs:
        start = time.perf_counter()
        answered = sum(1 for _ in backend.generate([request], sampling_of(gen)))
        if not answered:  # failed every retry on Ray: no latency to report
            return None
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
