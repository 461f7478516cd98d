"""The quickstart's final table: teacher, student before and after on the trained task, then the
student before and after on every transfer set (other phrasings, other task families), with the
change and whether it is inside the noise."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from potstill.data import read_records
from potstill.eval.compare import NOISE_Z, inside_noise, stderr


def _questions(stage: str) -> str:
    return "train" if stage == "generate" else "held-out"


def transfer_rows(results: dict[str, dict], transfer: dict[str, str]) -> list[dict]:
    """One row per transfer set ({set: kind}): the student's accuracy before and after, the
    change in points, its standard error and whether it is inside the noise. `results`: each
    stage's eval.json."""
    found = {
        (stage, r["task"]): r
        for stage in ("eval-before", "eval-after")
        for r in results[stage]["results"]
    }
    rows = []
    for name, kind in transfer.items():
        before, after = found.get(("eval-before", name)), found.get(("eval-after", name))
        if before is None or after is None:
            continue
        spread = [stderr(r["accuracy"], r["n"]) for r in (before, after)]
        se = math.hypot(*spread)
        change = after["accuracy"] - before["accuracy"]
        rows.append({
            "set": name, "kind": kind, "n": after["n"],
            "before": before["accuracy"], "after": after["accuracy"],
            "change_points": round(100 * change, 1), "stderr_points": round(100 * se, 1),
            "inside_noise": inside_noise(before, after),
        })  # fmt: skip
    return rows


def summarise(path: Path, task_name: str, transfer: dict[str, str] | None = None) -> dict:
    """The rows of the final table (teacher, student before, student after) on the trained
    task, the headline, and the transfer rows."""
    rows = {}
    stages = ("generate", "eval-before", "eval-after")  # a held-out teacher row wins
    results = {stage: json.loads((path / stage / "eval.json").read_text()) for stage in stages}
    for stage, result in results.items():
        costs = {m["label"]: m for m in result["models"]}
        for r in result["results"]:
            if r["task"] != task_name:
                continue  # a transfer set: its own rows below
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
        "transfer": transfer_rows(results, transfer or {}),
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
    _print_transfer(summary.get("transfer", []), console)
    console.print(f"report: {report_path}")


def _print_transfer(rows: list[dict], console: Console) -> None:
    """Does the gain carry beyond the trained task? The student before and after on each set."""
    if not rows:
        return
    from rich import box

    table = Table(
        title="beyond the trained task (student, same decoding)", box=box.SIMPLE_HEAD,
        padding=(0, 1), collapse_padding=True, pad_edge=False, show_edge=False,
        caption=f"± one standard error; ~ inside the noise (< {NOISE_Z:g} combined s.e.)",
    )  # fmt: skip
    for col in ("held-out set", "kind", "n", "before", "after", "change"):
        table.add_column(col, justify="left" if col in ("held-out set", "kind") else "right")
    for r in rows:
        mark = " ~" if r["inside_noise"] else ""
        table.add_row(
            r["set"], r["kind"].replace("_", " "), str(r["n"]), f"{r['before']:.1%}",
            f"{r['after']:.1%}", f"{r['change_points']:+.1f} ± {r['stderr_points']:.1f}{mark}",
        )  # fmt: skip
    console.print(table)
