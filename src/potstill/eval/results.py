"""Where an eval keeps each model's answers, and the results table built from them."""

from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from potstill.data import read_shards
from potstill.eval.bench import score_samples
from potstill.eval.cost import (
    hardware_name,
)


def slug(text: str) -> str:
    """A folder name for a label or task name: runs of other characters become one '-', and
    leading/trailing '-' and '.' go, so no name is '.', '..' or hidden (none leaves the run)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def folder_clash(names: list[str]) -> tuple[str, str, str] | None:
    """The first two distinct names that would share one folder, and that folder: the same slug,
    or slugs that differ in case only (one folder on a case-insensitive disk). Sharing a folder,
    the second would read the first one's answers as its own."""
    first_of: dict[str, str] = {}
    for name in names:
        first = first_of.setdefault(slug(name).casefold(), name)
        if first != name:
            return first, name, slug(first)
    return None


def answers_dir(run_path: Path, label: str, task: str) -> Path:
    return run_path / "answers" / slug(label) / slug(task)


def collect_results(cfg, run, costs: dict, tasks: dict) -> dict:
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
