"""The report's figures, drawn with matplotlib (Agg) and returned as base64 PNG data URIs:
training curves and the curation funnel here, the Pareto view in `pareto.py`, one style for all.

Each function returns None when there is nothing to draw, so the page can say so instead.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager

from potstill.report.collect import Run

PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626"]
INK, MUTED, GRID = "#1f2937", "#6b7280", "#e5e7eb"
TEACHER, BEFORE, STUDENT = "#7c3aed", "#94a3b8", "#0d9488"
DPI = 100
"""Logical pixels per inch: a figure w inches wide shows w*100 CSS pixels wide."""
SCALE = 2
"""Saved at twice that resolution so it stays sharp on high-density screens."""


@contextmanager
def style() -> Iterator[None]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import rc_context

    with rc_context(
        {
            "font.family": "DejaVu Sans",
            "font.size": 9.5,
            "axes.edgecolor": "#9ca3af",
            "axes.labelcolor": INK,
            "axes.titlesize": 10.5,
            "axes.titleweight": "bold",
            "axes.titlecolor": INK,
            "axes.titlelocation": "left",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.color": GRID,
            "grid.linewidth": 0.8,
            "xtick.color": MUTED,
            "ytick.color": MUTED,
            "legend.frameon": False,
            "legend.fontsize": 8.5,
        }
    ):
        yield


def to_data_uri(fig) -> str:
    """A figure as a `data:image/png;base64,...` URI; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI * SCALE, facecolor="white")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


PANELS = (
    ("loss", "loss and its parts"),
    ("alpha", "α (kd_ratio)"),
    ("reward", "reward"),
    ("reward_parts", "reward parts"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("throughput", "throughput (tokens/s)"),
)
LOSS_PARTS = {"loss", "ce", "kd", "soft", "hard", "nll", "kl", "jsd", "tvd", "sft", "policy"}


def panel_of(tag: str) -> str:
    """Which small-multiple a scalar goes in: loss parts together, α, reward, its parts, …"""
    t = tag.lower()
    leaf = t.rsplit("/", 1)[-1]
    if "reward" in t and leaf in ("reward", "reward_mean", "mean", "rlt_reward"):
        return "reward"
    if "reward" in t or leaf in ("r_ss", "r_kl", "rss", "rkl", "r^ss", "r^kl"):
        return "reward_parts"
    if leaf in ("kd_ratio", "alpha", "α") or "kd_ratio" in leaf:
        return "alpha"
    if leaf in ("lr", "learning_rate") or leaf.startswith("lr_"):
        return "lr"
    if "grad_norm" in leaf:
        return "grad_norm"
    if leaf.endswith("per_s") or leaf.endswith("per_sec"):
        return "throughput"
    if "loss" in t or leaf in LOSS_PARTS:
        return "loss"
    return "tag:" + tag


def group_curves(curves: dict[str, list]) -> list[tuple[str, dict[str, list]]]:
    """(panel title, {tag: points}) in a fixed panel order; unknown tags get a panel each."""
    groups: dict[str, dict[str, list]] = {}
    for tag, pts in curves.items():
        if pts:
            groups.setdefault(panel_of(tag), {})[tag] = pts
    titles = dict(PANELS)
    order = [key for key, _ in PANELS if key in groups] + sorted(
        k for k in groups if k not in titles
    )
    return [(titles.get(k, k.removeprefix("tag:")), groups[k]) for k in order]


def curves(run: Run) -> str | None:
    """Small multiples of a training run's scalars; raw values faint, smoothed on top."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator, ScalarFormatter

    panels = group_curves(run.curves)
    if not panels:
        return None
    ncols = len(panels) if len(panels) <= 4 else 3
    nrows = math.ceil(len(panels) / ncols)
    with style():
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(9.6, 2.7 * nrows), layout="constrained", squeeze=False
        )
        for ax, (title, series) in zip(axes.flat, panels, strict=False):
            for i, (tag, pts) in enumerate(_merge_equal(series).items()):
                color = PALETTE[i % len(PALETTE)]
                steps, values = [p[0] for p in pts], [p[1] for p in pts]
                if len(pts) > 40:
                    ax.plot(steps, values, color=color, lw=0.8, alpha=0.25)
                    ax.plot(steps, _ema(values), color=color, lw=1.6, label=tag)
                else:
                    ax.plot(steps, values, color=color, lw=1.6, marker="o", ms=3.5, label=tag)
            ax.set_title(title)
            ax.set_xlabel("step", color=MUTED)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
            # Plain tick labels: an offset text ("1e-4") above the axis would push the title up.
            if title == "learning rate":  # spans decades down to 0: 2e-4, 1.5e-4, 5e-5
                ax.yaxis.set_major_formatter(FuncFormatter(_tick))
            else:  # as many digits as the range needs (5.701, 5.703), never a shared offset
                ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
            values = [v for pts in series.values() for _, v in pts]
            lo, hi = min(values), max(values)
            if hi - lo <= 1e-9 * max(abs(hi), 1e-12):  # a constant: centre it, no 1e-9 ticks
                ax.set_ylim(lo - abs(lo) * 0.5 - 1e-12, hi + abs(hi) * 0.5 + 1e-12)
            labels = list(_merge_equal(series))
            if len(labels) > 1 or " = " in labels[0]:
                ax.legend(loc="best")
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        return to_data_uri(fig)


def _tick(v: float, _pos=None) -> str:
    """3 significant digits; small numbers as 2e-4 rather than 0.0002 or 2.0e-04."""
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.3g}"
    mantissa, exp = f"{v:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exp)}"


def _merge_equal(series: dict[str, list]) -> dict[str, list]:
    """Series with identical points drawn once, labelled `loss = ce` (SFT's loss is its CE)."""
    merged: dict[str, list] = {}
    for tag, pts in series.items():
        same = next((k for k, v in merged.items() if v == pts), None)
        if same is None:
            merged[tag] = pts
        else:
            merged[f"{same} = {tag}"] = merged.pop(same)
    return merged


def _ema(values: list[float], span: int | None = None) -> list[float]:
    span = span or max(5, len(values) // 20)
    alpha, out, avg = 2 / (span + 1), [], values[0]
    for v in values:
        avg = alpha * v + (1 - alpha) * avg
        out.append(avg)
    return out


def funnel(data: dict) -> str | None:
    """funnel.json as horizontal bars: records kept after each step, what it dropped and why."""
    import matplotlib.pyplot as plt

    steps = [s for s in data.get("steps") or [] if isinstance(s, dict)]
    start = (data.get("input") or {}).get("records")
    if start is None and steps:
        start = steps[0].get("records_in")
    if start is None:
        return None
    rows = [("input", start, 0, {}, (data.get("input") or {}).get("questions"))]
    rows += [
        (
            s.get("name", "?"),
            s.get("records_out", 0),
            s.get("records_in", 0) - s.get("records_out", 0),
            {**(s.get("reasons") or {}), **{k: v for k, v in (s.get("notes") or {}).items() if v}},
            s.get("questions_out"),
        )
        for s in steps
    ]
    with style():
        fig, ax = plt.subplots(figsize=(9.6, 0.42 * len(rows) + 1.0), layout="constrained")
        ys = range(len(rows))
        kept = [r[1] for r in rows]
        dropped = [r[2] for r in rows]
        ax.barh(ys, kept, color=STUDENT, height=0.62, label="records kept")
        ax.barh(ys, dropped, left=kept, color="#fca5a5", height=0.62, label="dropped here")
        top = max(start, 1)
        for y, (_, out, drop, reasons, questions) in zip(ys, rows, strict=True):
            why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
            text = f"{out}"
            if questions is not None:
                text += f"  ({questions} questions)"
            if drop or why:  # why also holds notes that drop no record (unsolved_questions 2)
                text += f"   −{drop}: {why}" if drop else f"   {why}"
            ax.text(out + drop + top * 0.01, y, text, va="center", fontsize=9, color=INK)
        ax.set_yticks(list(ys), [r[0] for r in rows])
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.65)
        ax.set_xticks([t for t in ax.get_xticks() if 0 <= t <= top])  # no ticks under the notes
        ax.set_xlabel("records")
        ax.grid(axis="y", visible=False)
        ax.set_axisbelow(True)
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2)
        return to_data_uri(fig)
