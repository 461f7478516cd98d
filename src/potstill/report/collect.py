"""Find run directories under the report's inputs and read each into plain data.

A run directory is any directory holding a `manifest.json`; its kind is the manifest's `command`.
Nothing here fails on a partial run: what cannot be read becomes a `missing` line instead.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from potstill.errors import ConfigError

TRAIN_COMMANDS = ("sft", "distill", "rlt_warmup", "rlt_train", "onpolicy")
"""Commands whose runs log training curves (TensorBoard events, metrics.jsonl)."""


@dataclass
class EvalModel:
    """One evaluated model (eval.json `models` entry), merged over eval runs by label."""

    label: str
    name: str
    role: str
    cost: dict
    run: str
    """Display name of the eval run it came from."""


@dataclass
class EvalResult:
    model: str
    task: str
    n: int
    accuracy: float
    samples: int = 1
    correct: int | None = None
    pass_at_k: dict = field(default_factory=dict)
    maj_at_k: dict = field(default_factory=dict)


@dataclass
class Run:
    path: Path
    name: str
    """Where it sits under the input path, e.g. `gsm/sft`."""
    command: str
    status: str
    """The last attempt's status: completed, interrupted, failed, running; `unknown` if none."""
    created: str
    manifest: dict
    config: dict | None = None
    config_text: str = ""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    curves_source: str | None = None
    funnel: dict | None = None
    eval: dict | None = None
    samples: dict | None = None
    """For generate runs whose manifest has no counts: what the sample shards hold."""
    missing: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict:
        return self.manifest.get("counts") or {}

    @property
    def wall_s(self) -> float | None:
        """Seconds the stage worked: its timings, else the spans of its attempts."""
        timings = self.manifest.get("timings") or {}
        if timings:
            return float(sum(timings.values()))
        spans = [_span(a) for a in self.manifest.get("attempts") or []]
        spans = [s for s in spans if s is not None]
        return float(sum(spans)) if spans else None

    @property
    def is_training(self) -> bool:
        return self.command in TRAIN_COMMANDS or bool(self.curves)


@dataclass
class Collection:
    roots: list[Path]
    runs: list[Run]
    missing: list[str]
    price_per_hour: float | None
    price_note: str
    models: dict[str, EvalModel]
    results: list[EvalResult]

    def of_kind(self, *commands: str) -> list[Run]:
        return [r for r in self.runs if r.command in commands]

    @property
    def training(self) -> list[Run]:
        return [r for r in self.runs if r.is_training]

    def contains(self, run: Run) -> int:
        """How many other runs sit inside this one's directory (a quickstart holds its stages)."""
        return sum(1 for r in self.runs if r is not run and run.path in r.path.parents)

    @property
    def total_seconds(self) -> float:
        """Working time of all runs, a run that holds others counted through them, not twice."""
        return sum(r.wall_s or 0 for r in self.runs if not self.contains(r))

    def all_missing(self) -> list[str]:
        return [*self.missing, *(f"{r.name}: {m}" for r in self.runs for m in r.missing)]


def collect(paths: list[Path], *, price_per_hour: float | None = None) -> Collection:
    """Read every run under `paths`. A path that does not exist, or no run anywhere, is an error;
    one path of several holding no run is a missing line."""
    roots = [Path(p) for p in paths]
    if not roots:
        raise ConfigError("report: give at least one run directory")
    missing, runs, seen = [], [], set()
    for root in roots:
        if not root.exists():
            raise ConfigError(f"report: {root} does not exist; give a run directory")
        found = find_run_dirs(root)
        if not found:
            missing.append(f"{root}: no run directory (a directory with manifest.json) inside")
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                runs.append(read_run(path, _display_name(root, path)))
    if not runs:
        where = ", ".join(str(r) for r in roots)
        raise ConfigError(f"report: no run directory (with a manifest.json) under {where}")
    runs.sort(key=lambda r: (r.created, r.name))
    models, results, price, note = _merge_evals(runs, missing)
    if price_per_hour is not None:
        price, note = price_per_hour, "--price-per-hour"
    if not models:
        missing.append("no eval run (eval.json): run `potstill eval` for accuracy and cost")
    if price is None and any(r.wall_s for r in runs):
        missing.append("no price per hour (eval.json price, or --price-per-hour): no run costs")
    return Collection(roots, runs, missing, price, note, models, results)


def find_run_dirs(root: Path) -> list[Path]:
    if root.is_file():
        root = root.parent if root.name == "manifest.json" else root
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.rglob("manifest.json") if p.is_file())


def _display_name(root: Path, path: Path) -> str:
    root = root.parent if root.is_file() else root
    base = root.resolve().name or str(root)
    rel = path.resolve().relative_to(root.resolve())
    return base if rel == Path(".") else f"{base}/{rel.as_posix()}"


def read_run(path: Path, name: str | None = None) -> Run:
    """A run directory as plain data; unreadable or absent parts become `missing` lines."""
    name = name or path.name
    missing: list[str] = []
    manifest = _read_json(path / "manifest.json", missing) or {}
    attempts = manifest.get("attempts") or []
    status = attempts[-1].get("status", "unknown") if attempts else "unknown"
    run = Run(
        path=path,
        name=name,
        command=str(manifest.get("command", "unknown")),
        status=status,
        created=str(manifest.get("created", "")),
        manifest=manifest,
        missing=missing,
    )
    if status != "completed":
        what = f"last attempt {status}" if attempts else "no attempt recorded"
        missing.append(f"did not complete ({what}); its outputs may be partial")
    config_path = path / "config.yaml"
    if config_path.is_file():
        run.config_text = config_path.read_text(encoding="utf-8", errors="replace")
        try:
            loaded = yaml.safe_load(run.config_text)
            run.config = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError:
            missing.append("config.yaml is not valid YAML")
    else:
        missing.append("config.yaml")
    _READERS.get(run.command, _read_other)(run)
    return run


def _read_eval(run: Run) -> None:
    run.eval = _read_json(run.path / "eval.json", run.missing)


def _read_curate(run: Run) -> None:
    run.funnel = _read_json(run.path / "funnel.json", run.missing)


def _read_generate(run: Run) -> None:
    if run.counts.get("samples") is not None:
        return
    # An interrupted run writes no counts: count what its shards hold.
    files = sorted((run.path / "samples").glob("*.jsonl"))
    if not files:
        run.missing.append("samples/ (no generated shards)")
        return
    samples = tokens = truncated = 0
    for file in files:
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
            samples += 1
            tokens += int(record.get("completion_tokens") or 0)
            truncated += record.get("finish_reason") == "length"
    run.samples = {"samples": samples, "completion_tokens": tokens, "truncated": truncated}
    seconds = (run.manifest.get("timings") or {}).get("generate")
    if seconds and tokens:
        run.samples["tokens_per_s"] = round(tokens / seconds, 2)


def _read_training(run: Run) -> None:
    run.curves = read_event_scalars(run.path / "logs")
    if run.curves:
        run.curves_source = "tensorboard"
        return
    metrics = run.path / "metrics.jsonl"
    if metrics.is_file():
        run.curves = read_metrics_curves(metrics)
        run.curves_source = "metrics.jsonl"
        run.missing.append(
            "TensorBoard events (logs/train/events.out.tfevents.*); curves read from metrics.jsonl"
        )
    else:
        run.missing.append("training curves (no TensorBoard events, no metrics.jsonl)")


def _read_other(run: Run) -> None:
    if (run.path / "eval.json").is_file():
        _read_eval(run)
    if (run.path / "funnel.json").is_file():
        _read_curate(run)
    if (
        any((run.path / "logs").rglob("events.out.tfevents*"))
        or (run.path / "metrics.jsonl").is_file()
    ):
        _read_training(run)


_READERS = {
    "eval": _read_eval,
    "curate": _read_curate,
    "generate": _read_generate,
    **dict.fromkeys(TRAIN_COMMANDS, _read_training),
}


def read_event_scalars(logs: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `logs`, as tag -> [(step, value)].

    Tags from a directory other than `logs/train` are prefixed with it. A step logged twice (a
    resumed run redoing it) keeps its last value."""
    dirs = sorted({p.parent for p in logs.rglob("events.out.tfevents*")}) if logs.is_dir() else []
    if not dirs:
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return {}
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    curves: dict[str, list[tuple[int, float]]] = {}
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        try:
            acc.Reload()
        except Exception:  # a torn event file: keep what other directories hold
            continue
        prefix = "" if d.relative_to(logs).as_posix() in (".", "train") else f"{d.name}/"
        for tag in acc.Tags().get("scalars", []):
            by_step = {int(e.step): float(e.value) for e in acc.Scalars(tag)}
            curves[prefix + tag] = sorted(by_step.items())
    return curves


def read_metrics_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl (one line per step, last entry per step winning) as tag -> [(step, value)]."""
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "step" in entry:
            by_step[int(entry["step"])] = entry
    curves: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                curves.setdefault(key, []).append((step, float(value)))
    return curves


def _merge_evals(runs: list[Run], missing: list[str]):
    """Models keyed by label over all eval runs (a later run's label wins), their results, and
    the price per hour from the eval runs."""
    models: dict[str, EvalModel] = {}
    results: dict[tuple[str, str], EvalResult] = {}
    price, note = None, ""
    for run in runs:
        data = run.eval
        if not isinstance(data, dict):
            continue
        block = data.get("price") or {}
        if isinstance(block.get("usd_per_hour"), int | float):
            if price is not None and block["usd_per_hour"] != price:
                missing.append(
                    f"eval runs disagree on the price per hour ({price} vs "
                    f"{block['usd_per_hour']} in {run.name}); using {block['usd_per_hour']}"
                )
            price = float(block["usd_per_hour"])
            note = f"{block.get('hardware') or 'eval hardware'} (from {run.name})"
        for m in data.get("models") or []:
            if isinstance(m, dict) and m.get("label"):
                models[m["label"]] = EvalModel(
                    label=m["label"],
                    name=str(m.get("name", m["label"])),
                    role=str(m.get("role", "student")),
                    cost=_cost_of(m),
                    run=run.name,
                )
        for r in data.get("results") or []:
            try:
                result = EvalResult(
                    model=r["model"],
                    task=str(r.get("task", "task")),
                    n=int(r.get("n") or 0),
                    accuracy=float(r["accuracy"]),
                    samples=int(r.get("samples") or 1),
                    correct=r.get("correct"),
                    pass_at_k=dict(r.get("pass@k") or {}),
                    maj_at_k=dict(r.get("maj@k") or {}),
                )
            except (KeyError, TypeError, ValueError):
                run.missing.append(f"eval.json: an unreadable result entry {str(r)[:60]}")
                continue
            results[(result.model, result.task)] = result
    for label in sorted({r.model for r in results.values()} - set(models)):
        missing.append(f"eval result for '{label}' has no model entry (no cost)")
    return models, list(results.values()), price, note


def _cost_of(model: dict) -> dict:
    """The model's cost block: nested under `cost`, or (as `potstill eval` writes it) its fields
    flat beside label, name and role."""
    if isinstance(model.get("cost"), dict):
        return dict(model["cost"])
    return {k: v for k, v in model.items() if k not in ("label", "name", "role", "cost")}


def _read_json(path: Path, missing: list[str]):
    if not path.is_file():
        missing.append(path.name)
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        missing.append(f"{path.name} is unreadable ({exc.__class__.__name__})")
        return None


def _span(attempt: dict) -> float | None:
    try:
        started = datetime.fromisoformat(attempt["started"])
        finished = datetime.fromisoformat(attempt["finished"])
    except (KeyError, TypeError, ValueError):
        return None
    return max((finished - started).total_seconds(), 0.0)
