"""The table of the RLT students experiment (scripts/rlt_students_experiment.sh), as Markdown.

    python scripts/rlt_students_table.py [runs/rlt-students]

For each student size and held-out set: accuracy ± its standard error for every explanation
source, then paired differences on the same questions (each student answers the same ones,
greedy) with their standard errors: every source against the student before fine-tuning, and the
GRPO-trained teacher against the same teacher before GRPO. `~` marks a difference inside the
noise (|difference| < 2 standard errors).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from potstill.eval.results import slug

SOURCES = ["before", "on GRPO teacher", "on pre-GRPO teacher", "on raw solutions",
           "on 1.5B traces"]  # fmt: skip
PAIRS = [("on GRPO teacher", "on pre-GRPO teacher")] + [(s, "before") for s in SOURCES[1:]]


def verified(eval_dirs: list[Path], size: str) -> dict[tuple[str, str], dict[str, float]]:
    """(label, task) -> {question id: 1.0 | 0.0} from the answer files of eval runs (a later
    run's answers for the same label and task replace an earlier one's)."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for eval_dir in eval_dirs:
        for label in (f"{size} {s}" for s in SOURCES):
            folder = eval_dir / "answers" / slug(label)
            for task_dir in sorted(folder.iterdir()) if folder.is_dir() else []:
                rows = [json.loads(line) for f in sorted(task_dir.glob("*.jsonl"))
                        for line in f.read_text().splitlines() if line.strip()]  # fmt: skip
                if rows:  # an empty folder (a run still going) replaces nothing
                    out[(label, task_dir.name)] = {
                        r["source_id"]: float(r["verified"]) for r in rows
                    }
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def cell(values: list[float], signed: bool = False) -> str:
    mean, se = mean_se(values)
    mark = " ~" if signed and abs(mean) < 2 * se else ""
    return (
        f"{100 * mean:+.1f} ± {100 * se:.1f}{mark}"
        if signed
        else f"{100 * mean:.1f} ± {100 * se:.1f}"
    )


def table(size: str, scores: dict) -> list[str]:
    tasks = sorted({task for _, task in scores})
    lines = [f"| {size} student | " + " | ".join(SOURCES) + " |", "|---" * (len(SOURCES) + 1) + "|"]
    for task in tasks:
        row = [scores.get((f"{size} {s}", task)) for s in SOURCES]
        n = len(row[0]) if row[0] else 0
        cells = [cell(list(r.values())) if r else "not run" for r in row]
        lines.append(f"| {task} (n {n}) | " + " | ".join(cells) + " |")
    lines += ["", f"| {size}: paired difference (points) | " + " | ".join(tasks) + " |",
              "|---" * (len(tasks) + 1) + "|"]  # fmt: skip
    for a, b in PAIRS:
        cells = []
        for task in tasks:
            x, y = scores.get((f"{size} {a}", task)), scores.get((f"{size} {b}", task))
            cells.append(cell([x[q] - y[q] for q in x], signed=True) if x and y else "not run")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/rlt-students")
    for size in ("0.5B", "1.5B"):
        dirs = sorted(root.glob(f"eval-{size.lower()}*/"))
        scores = verified(dirs, size)
        if not scores:
            print(f"{size}: no answers under {root}/eval-{size.lower()}* yet\n")
            continue
        print("\n".join(table(size, scores)) + "\n")


if __name__ == "__main__":
    main()
