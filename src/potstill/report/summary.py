"""The numbers the report leads with, shared by the HTML page and the Markdown summary.

The headline compares the teacher with the student before and after distillation: how much of the
teacher's accuracy the student kept, at what fraction of its cost per answer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from potstill.report.collect import Collection, EvalModel, Run

_AFTER = re.compile(r"after|final|distill|trained|tuned|sft", re.I)
_BEFORE = re.compile(r"before|base|baseline|untrained|original", re.I)


@dataclass
class ModelRow:
    """One model's headline numbers (accuracy over the tasks the headline compares)."""

    label: str
    role: str
    name: str
    accuracy: float | None
    n: int
    usd_per_1k: float | None
    latency_s: float | None
    tokens_per_s: float | None
    params: float | None
    disk_bytes: float | None
    peak_memory_bytes: float | None


@dataclass
class Headline:
    teacher: ModelRow | None
    before: ModelRow | None
    after: ModelRow | None
    tasks: list[str]

    @property
    def kept(self) -> float | None:
        """The student's accuracy as a fraction of the teacher's."""
        t, a = self.teacher, self.after
        if t and a and t.accuracy and a.accuracy is not None:
            return a.accuracy / t.accuracy
        return None

    @property
    def cost_fraction(self) -> float | None:
        t, a = self.teacher, self.after
        if t and a and t.usd_per_1k and a.usd_per_1k is not None:
            return a.usd_per_1k / t.usd_per_1k
        return None

    def sentence(self) -> str:
        """One plain-text sentence: the answer to the report's first question."""
        t, b, a = self.teacher, self.before, self.after
        if not (t or a or b):
            return "No evaluation yet: run `potstill eval` to compare teacher and student."
        if t and a and self.kept is not None:
            text = f"The student keeps {pct(self.kept)} of the teacher's accuracy"
            text += f" ({pct(a.accuracy)} vs {pct(t.accuracy)})"
            if self.cost_fraction is not None:
                text += f" at {pct(self.cost_fraction)} of its cost per answer"
            if b and b.accuracy is not None:
                text += f"; before distillation it scored {pct(b.accuracy)}"
            return text + "."
        known = [m for m in (t, b, a) if m and m.accuracy is not None]
        return "Accuracy: " + ", ".join(f"{m.label} {pct(m.accuracy)}" for m in known) + "."

    @property
    def speedup(self) -> float | None:
        """The student's tokens/s over the teacher's."""
        t, a = self.teacher, self.after
        if t and a and t.tokens_per_s and a.tokens_per_s:
            return a.tokens_per_s / t.tokens_per_s
        return None

    @property
    def size_fraction(self) -> float | None:
        t, a = self.teacher, self.after
        if t and a and t.params and a.params:
            return a.params / t.params
        return None


def model_row(model: EvalModel | None, label: str, role: str, coll: Collection, tasks) -> ModelRow:
    results = [r for r in coll.results if r.model == label and (not tasks or r.task in tasks)]
    weight = sum(max(r.n, 1) for r in results)
    accuracy = sum(r.accuracy * max(r.n, 1) for r in results) / weight if results else None
    cost = model.cost if model else {}
    return ModelRow(
        label=label,
        role=model.role if model else role,
        name=model.name if model else label,
        accuracy=accuracy,
        n=sum(r.n for r in results),
        usd_per_1k=usd_per_1k(cost, coll.price_per_hour),
        latency_s=_float(cost.get("latency_s")),
        tokens_per_s=_float(cost.get("tokens_per_s")),
        params=_float(cost.get("params")),
        disk_bytes=_float(cost.get("disk_bytes")),
        peak_memory_bytes=_float(cost.get("peak_memory_bytes")),
    )


def usd_per_1k(cost: dict, price_per_hour: float | None) -> float | None:
    """The model's cost per 1,000 answers: as eval measured it, else seconds per answer (or
    latency) × price."""
    value = _float(cost.get("usd_per_1k_answers"))
    seconds = _float(cost.get("seconds_per_answer")) or _float(cost.get("latency_s"))
    if value is None and price_per_hour is not None and seconds:
        value = seconds * 1000 / 3600 * price_per_hour
    return value


def headline(coll: Collection) -> Headline:
    labels = list(coll.models) + [r.model for r in coll.results if r.model not in coll.models]
    labels = list(dict.fromkeys(labels))
    role = {lab: (coll.models[lab].role if lab in coll.models else "student") for lab in labels}
    teachers = [lab for lab in labels if role[lab] == "teacher"]
    students = [lab for lab in labels if role[lab] != "teacher"]
    before = next((s for s in students if _BEFORE.search(s)), None)
    rest = [s for s in students if s != before]
    after = next((s for s in reversed(rest) if _AFTER.search(s)), rest[-1] if rest else None)
    if before is None and len(rest) > 1:
        before = rest[0]
    teacher = teachers[0] if teachers else None
    chosen = [lab for lab in (teacher, before, after) if lab]
    task_sets = [{r.task for r in coll.results if r.model == lab} for lab in chosen]
    tasks = sorted(set.intersection(*task_sets)) if task_sets else []
    if not tasks:  # no task in common: each model over its own tasks
        tasks = sorted({r.task for r in coll.results})

    def row(lab):
        if lab is None:
            return None
        return model_row(coll.models.get(lab), lab, role[lab], coll, tasks)

    return Headline(row(teacher), row(before), row(after), tasks)


def all_rows(coll: Collection) -> list[ModelRow]:
    """Every evaluated model, teachers first, over each model's own tasks."""
    labels = list(dict.fromkeys([*coll.models, *(r.model for r in coll.results)]))
    rows = [model_row(coll.models.get(lab), lab, "student", coll, None) for lab in labels]
    return sorted(rows, key=lambda r: r.role != "teacher")


def run_cost(run: Run, price_per_hour: float | None) -> float | None:
    if run.wall_s is None or price_per_hour is None:
        return None
    return run.wall_s / 3600 * price_per_hour


def key_settings(run: Run) -> dict[str, str]:
    """The few config values that tell runs apart, by stage."""
    cfg = run.config or {}
    picks = {
        "model": ("model", "name"),
        "teacher": ("teacher", "name"),
        "student": ("student", "name"),
        "data": ("data", "source"),
        "backend": ("backend", "kind"),
        "samples/question": ("generation", "num_samples"),
        "temperature": ("generation", "temperature"),
        "max new tokens": ("generation", "max_new_tokens"),
        "lr": ("train", "lr"),
        "epochs": ("train", "epochs"),
        "max steps": ("train", "max_steps"),
        "batch": ("train", "micro_batch_size"),
        "grad accum": ("train", "grad_accum"),
        "loss": ("loss", "name"),
        "kd_ratio": ("loss", "kd_ratio"),
        "LoRA r": ("model", "lora", "r"),
        "select k": ("select", "k"),
        "models": ("models",),
        "tasks": ("tasks",),
        "eval tasks": ("eval", "tasks"),
        "n": ("eval", "limit"),
    }
    out = {}
    for label, keys in picks.items():
        value = cfg
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, list):  # models/tasks: scalars, or entries named by label/name
            names = [
                v.get("label") or v.get("name") or v.get("source") if isinstance(v, dict) else v
                for v in value
            ]
            value = ", ".join(str(v) for v in names if v is not None and not isinstance(v, list))
            value = value if len(value) <= 80 else value[:77] + "…"
        if value is not None and not isinstance(value, dict | list):
            out[label] = str(value)
    return out


def short_name(name: str, keep: int = 3) -> str:
    """A model directory as its last path parts (…/qs/sft/final); kit and hub names unchanged."""
    parts = name.split("/")
    if len(name) <= 40 or len(parts) <= keep:
        return name
    return "…/" + "/".join(parts[-keep:])


def pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x:.0%}" if abs(x) >= 0.1 else f"{x:.1%}"


def num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or x != x else f"{x:.{digits}g}"  # x != x: NaN


def usd(x: float | None) -> str:
    """Dollars, 3 significant digits below $1 without exponents: $0.0889, $0.10, <$0.001."""
    if x is None:
        return "—"
    if x >= 1:
        return f"${x:,.2f}"
    if x == 0:
        return "$0"
    if x < 0.001:
        return "<$0.001"
    text = f"{x:.{2 - math.floor(math.log10(x))}f}"
    whole, frac = text.split(".")
    return f"${whole}.{frac.rstrip('0').ljust(2, '0')}"


def size(x: float | None, unit: str = "B") -> str:
    if x is None:
        return "—"
    for prefix in ("", "K", "M", "G", "T"):
        if abs(x) < 1000 or prefix == "T":
            return f"{x:.3g} {prefix}{unit}" if unit else f"{x:.3g}{prefix}"
        x /= 1000
    return "—"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _float(x) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None
