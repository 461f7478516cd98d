"""The table of `potstill compare`: accuracy ± standard error per model × held-out set (with and
without the training system prompt), each method's student compute, the teacher's compute, and
which differences from the untrained student are inside the noise.

Standard error of an accuracy p over n questions: sqrt(p (1 − p) / n). A difference d between two
models is "inside the noise" when |d| < 2 · sqrt(se₁² + se₂²) (about a 95% interval; the two
evals share their questions, so this is conservative).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from potstill.eval.results import slug
from potstill.fsutil import atomic_write_text

BASELINE = "student (before)"
NOISE_Z = 2.0


@dataclass
class Method:
    name: str
    path: Path
    runs: list[Path] = field(default_factory=list)
    """Run directories the method wrote, in order; the last one's final/ is the student."""
    failed: str | None = None

    @property
    def final(self) -> Path:
        return self.runs[-1] / "final"


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else math.nan


def inside_noise(a: dict, b: dict) -> bool:
    """Whether accuracies a and b ({accuracy, n}) differ by less than NOISE_Z combined s.e."""
    se = math.hypot(stderr(a["accuracy"], a["n"]), stderr(b["accuracy"], b["n"]))
    difference = abs(a["accuracy"] - b["accuracy"])
    return difference == 0 or difference < NOISE_Z * se


def _training(method: Method, params: int | None) -> dict:
    """Steps, target tokens and seconds over the method's training runs; FLOPs ≈ 6 N T."""
    steps = tokens = 0
    seconds = 0.0
    for run in method.runs:
        ckpts = (
            sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
        )
        if not ckpts:
            continue  # the teacher cache: not a training run
        state = json.loads((ckpts[-1] / "state.json").read_text())
        steps, tokens = steps + state["step"], tokens + state["tokens"]
        seconds += json.loads((run / "manifest.json").read_text())["timings"].get("train", 0.0)
    flops = 6 * params * tokens if params else None
    return {"steps": steps, "tokens": tokens, "seconds": round(seconds, 1), "flops": flops}


def _results(path: Path) -> dict[tuple[str, str, str], dict]:
    """(model, set, variant) -> {accuracy, n, correct, usd_per_1k, params} from the eval runs."""
    out = {}
    for variant_dir in sorted((path / "eval").iterdir()):
        report = json.loads((variant_dir / "eval.json").read_text())
        costs = {m["label"]: m for m in report["models"]}
        for r in report["results"]:
            cost = costs.get(r["model"], {})
            out[(r["model"], r["task"], variant_dir.name)] = {
                "accuracy": r["accuracy"], "n": r["n"], "correct": r["correct"],
                "stderr": stderr(r["accuracy"], r["n"]),
                "usd_per_1k": cost.get("usd_per_1k_answers"), "params": cost.get("params"),
            }  # fmt: skip
    return out


def compare_table(path: Path, cfg, methods: list[Method]) -> dict:
    """Everything the table shows, as JSON-able data plus its Markdown."""
    results = _results(path)
    variants = sorted({v for _, _, v in results}, key=lambda v: v != "with_prompt")
    columns = [(s.name, s.kind, v) for s in cfg.held_out for v in variants]
    params = next((r["params"] for (m, _, _), r in results.items() if m == BASELINE), None)
    labels = [*(["teacher"] if cfg.eval_teacher else []), BASELINE, *(m.name for m in methods)]
    rows = []
    for label in labels:
        method = next((m for m in methods if m.name == label), None)
        cells = {}
        for name, _, variant in columns:
            cell = results.get((label, name, variant))
            base = results.get((BASELINE, name, variant))
            if cell and base and label not in ("teacher", BASELINE):
                cell = {**cell, "inside_noise": inside_noise(cell, base)}
            cells[f"{name}/{variant}"] = cell
        row = {"model": label, "cells": cells, "nll": _nll(path, label)}
        if method is not None:
            row["failed"] = method.failed
            row["training"] = _training(method, params) if method.failed is None else None
        rows.append(row)
    traces_s, cache_s = _teacher_seconds(path)
    teacher_s = round(traces_s + cache_s, 1)
    teacher = {
        "seconds": teacher_s, "traces_s": traces_s, "cache_s": cache_s,
        "usd": round(teacher_s / 3600 * cfg.cost.usd_per_hour, 4),
    }  # fmt: skip
    table = {
        "budget": {
            "max_steps": cfg.budget.max_steps,
            "micro_batch_size": cfg.budget.micro_batch_size,
            "grad_accum": cfg.budget.grad_accum,
        },
        "columns": [{"set": n, "kind": k, "variant": v} for n, k, v in columns],
        "rows": rows,
        "teacher_compute": teacher,
    }  # fmt: skip
    table["markdown"] = markdown(table)
    return table


def _nll(path: Path, label: str) -> dict | None:
    """{set: {nll, stderr, answers}, "pooled": ...} from nll/LABEL.json (stages/compare.py), or
    None. Pooled: the answer-weighted mean of the sets, its s.e. sqrt(Σ (n_i/N)² se_i²)."""
    file = path / "nll" / f"{slug(label)}.json"
    if not file.is_file():
        return None
    sets = json.loads(file.read_text())
    scored = [v for v in sets.values() if v["answers"] and v["nll"] is not None]
    total = sum(v["answers"] for v in scored)
    pooled = None
    if total:
        mean = sum(v["nll"] * v["answers"] for v in scored) / total
        var = sum((v["answers"] / total) ** 2 * (v["stderr"] or 0.0) ** 2 for v in scored)
        pooled = {"nll": mean, "stderr": math.sqrt(var), "answers": total}
    return {**sets, "pooled": pooled}


def _teacher_seconds(path: Path) -> tuple[float, float]:
    """The teacher's own work, in seconds: its traces, and its top-k cache (if built)."""
    spent = []
    for run, key in (("traces", "eval"), ("teacher-cache", "teacher")):
        manifest = path / run / "manifest.json"
        total = 0.0
        if manifest.is_file():
            timings = json.loads(manifest.read_text())["timings"]
            total = sum(v for k, v in timings.items() if k.startswith(key) or k == "teacher")
        spent.append(round(total, 1))
    return spent[0], spent[1]


def _cell(cell: dict | None) -> str:
    if not cell:
        return "—"
    text = f"{cell['accuracy']:.1%} ± {cell['stderr']:.1%}"
    return text + (" ~" if cell.get("inside_noise") else "")


def markdown(table: dict) -> str:
    heads = [
        f"{c['set']} ({c['kind']}, {c['variant'].replace('_', ' ')})" for c in table["columns"]
    ]
    keys = [f"{c['set']}/{c['variant']}" for c in table["columns"]]
    lines = [
        "| model | steps | train tokens | train s | ≈ FLOPs | held-out NLL | "
        + " | ".join(heads)
        + " |",
        "|---" * (6 + len(heads)) + "|",
    ]
    for row in table["rows"]:
        t = row.get("training") or {}
        flops = f"{t['flops']:.2e}" if t.get("flops") else "—"
        train = [str(t.get("steps", "—")), f"{t.get('tokens', '—')}", f"{t.get('seconds', '—')}"]
        if row.get("failed"):
            train = ["failed", row["failed"][:40], "—"]
        cells = [_cell(row["cells"].get(k)) for k in keys]
        pooled = (row.get("nll") or {}).get("pooled")
        nll = f"{pooled['nll']:.3f} ± {pooled['stderr']:.3f}" if pooled else "—"
        lines.append(f"| {row['model']} | " + " | ".join([*train, flops, nll, *cells]) + " |")
    b, tc = table["budget"], table["teacher_compute"]
    lines += [
        "",
        f"Budget: {b['max_steps']} optimizer steps of {b['micro_batch_size']} × {b['grad_accum']} "
        "sequences for every method. ± is one standard error; ~ marks a difference from the "
        f"untrained student inside the noise (< {NOISE_Z:g} combined s.e.). FLOPs ≈ 6 · params · "
        "target tokens trained on (sampling and teacher forwards not included). Held-out NLL: "
        "mean −log p per token of the teacher's verified held-out answers (every set, with the "
        "training prompt), ± s.e. across answers; lower is closer to the teacher. Teacher: "
        f"{tc['seconds']} s of traces and cache (≈ ${tc['usd']}).",
    ]
    return "\n".join(lines)


def write_tables(path: Path, table: dict) -> None:
    atomic_write_text(path / "compare.json", json.dumps(table, indent=2, default=str) + "\n")
    atomic_write_text(path / "compare.md", table["markdown"] + "\n")
