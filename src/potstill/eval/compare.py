"""The table of `potstill compare`: accuracy ± standard error per model × held-out set (with and
without the training system prompt), each method's student compute, the teacher's compute, and
which differences from the untrained student are inside the noise.

Standard error of an accuracy p over n questions: sqrt(p (1 − p) / n). A difference d between two
models is "inside the noise" when |d| < 2 · sqrt(se₁² + se₂²) (about a 95% interval; the two
evals share their questions, so this is conservative).

A method trained with several seeds shows the mean accuracy over its seeds ± their sample sd;
its noise is then sqrt(p̄ (1 − p̄) / n + sd² / k) over k seeds (the questions' sampling error,
which more seeds on the same questions do not shrink, plus the seeds' own spread).
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
    seed: int = 0
    label: str = ""
    """Its models' name in the evals: the method's name for the first seed."""

    def __post_init__(self):
        self.label = self.label or self.name

    @property
    def final(self) -> Path:
        return self.runs[-1] / "final"


def stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else math.nan


def inside_noise(a: dict, b: dict) -> bool:
    """Whether accuracies a and b ({accuracy, n}) differ by less than NOISE_Z combined s.e."""
    se = math.hypot(*(c.get("stderr", stderr(c["accuracy"], c["n"])) for c in (a, b)))
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
    names = list(dict.fromkeys(m.name for m in methods))
    labels = [*(["teacher"] if cfg.eval_teacher else []), BASELINE, *names]
    rows = []
    for label in labels:
        group = [m for m in methods if m.name == label] or None
        cells = {}
        for name, _, variant in columns:
            seeds = [m.label for m in group if m.failed is None] if group else [label]
            cell = _over_seeds([results.get((s, name, variant)) for s in seeds])
            base = results.get((BASELINE, name, variant))
            if cell and base and group:
                cell = {**cell, "inside_noise": inside_noise(cell, base)}
            cells[f"{name}/{variant}"] = cell
        row = {"model": label, "cells": cells}
        row["nll"] = _nll_over_seeds(path, [m.label for m in group] if group else [label])
        if group is not None:
            trained = [m for m in group if m.failed is None]
            row["seeds"] = [m.seed for m in trained]
            row["failed"] = next((m.failed for m in group if m.failed is not None), None)
            row["training"] = _training(trained[0], params) if trained else None
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
        # the seeds every row has so far (a table written after each seed: compare.py)
        "seeds": [s for s in getattr(cfg, "seeds", [0]) if any(m.seed == s for m in methods)],
        "columns": [{"set": n, "kind": k, "variant": v} for n, k, v in columns],
        "rows": rows,
        "teacher_compute": teacher,
    }  # fmt: skip
    table["markdown"] = markdown(table)
    return table


def _over_seeds(cells: list[dict | None]) -> dict | None:
    """One seed's cell as it is; several seeds' cells as their mean ± sd (module docstring)."""
    cells = [c for c in cells if c]
    if len(cells) <= 1:
        return cells[0] if cells else None
    k, n = len(cells), cells[0]["n"]
    accuracies = [c["accuracy"] for c in cells]
    mean = sum(accuracies) / k
    sd = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (k - 1))
    return {
        **cells[0], "accuracy": mean, "correct": sum(c["correct"] for c in cells) / k,
        "stderr": math.sqrt(mean * (1 - mean) / n + sd**2 / k), "sd": sd,
        "per_seed": accuracies,
    }  # fmt: skip


def _nll_over_seeds(path: Path, labels: list[str]) -> dict | None:
    """The held-out NLL of one seed's student; with several, each set's and the pooled NLL is
    the mean over seeds, with "sd" their spread and "stderr" the mean's answer s.e."""
    found = [n for n in (_nll(path, label) for label in labels) if n is not None]
    if len(found) <= 1:
        return found[0] if found else None
    out = {}
    for key, first in found[0].items():
        vals = [f[key] for f in found if f.get(key) and f[key].get("nll") is not None]
        if not vals or first is None:
            out[key] = first
            continue
        mean = sum(v["nll"] for v in vals) / len(vals)
        sd = math.sqrt(sum((v["nll"] - mean) ** 2 for v in vals) / max(len(vals) - 1, 1))
        se = sum(v["stderr"] or 0.0 for v in vals) / len(vals)
        out[key] = {"nll": mean, "stderr": se, "sd": sd, "answers": first["answers"]}
    return out


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
    if "sd" in cell:
        text += f" (sd {cell['sd']:.1%})"
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
    if len(table.get("seeds", [])) > 1:
        lines.append(
            f"Every method trained with {len(table['seeds'])} seeds ({table['seeds']}): a cell "
            "is the mean over seeds ± sqrt(p̄(1 − p̄)/n + sd²/k), with the seeds' sd; training "
            "columns are the first seed's."
        )
    return "\n".join(lines)


def write_tables(path: Path, table: dict) -> None:
    atomic_write_text(path / "compare.json", json.dumps(table, indent=2, default=str) + "\n")
    atomic_write_text(path / "compare.md", table["markdown"] + "\n")
