"""The Pareto view: accuracy against cost per 1,000 answers, one panel per task."""

from __future__ import annotations

import math

from potstill.report.collect import Collection
from potstill.report.plots import BEFORE, MUTED, PALETTE, STUDENT, TEACHER, style, to_data_uri
from potstill.report.summary import Headline, usd_per_1k


def pareto(coll: Collection, head: Headline) -> str | None:
    """Accuracy against cost per 1k answers, one panel per task: teacher ★, students ●, coloured
    as in the headline cards; the Pareto frontier dashed; an arrow from the student before
    distillation to after."""
    import matplotlib.pyplot as plt

    points = _points(coll)
    if not points:
        return None
    tasks = list(dict.fromkeys(p[0] for p in points))
    ends = (head.before.label if head.before else None, head.after.label if head.after else None)
    colors = _colors(points, *ends)
    costs, accs = [p[3] for p in points], [p[4] for p in points]
    log = max(costs) / min(costs) > 20
    limits = (
        _padded(min(costs), max(costs), log),
        (max(0.0, min(accs) - 0.1), min(1.0, max(accs) + 0.1) + 0.06),
    )
    ncols = min(len(tasks), 3)
    nrows = math.ceil(len(tasks) / ncols)
    todo = []  # labels to place once the layout is known
    with style():
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(9.6, 4.4 if nrows == 1 else 3.4 * nrows),
            layout="constrained",
            squeeze=False,
            sharey=True,
        )
        for ax, task in zip(axes.flat, tasks, strict=False):
            mine = sorted((p for p in points if p[0] == task), key=lambda p: (p[3], -p[4]))
            todo += _panel(ax, task, mine, colors, ends, log, limits)
        for ax in axes[:, 0]:
            ax.set_ylabel("accuracy  (better ↑)", color=MUTED)
        for ax in list(axes.flat)[len(tasks) :]:
            ax.set_visible(False)
        fig.canvas.draw()  # lay out first: labels are placed in screen space
        _place_labels(fig, todo)
        return to_data_uri(fig)


def _points(coll: Collection) -> list[tuple]:
    """(task, label, role, cost, accuracy) of every result with a known, positive cost."""
    points = []
    for r in coll.results:
        model = coll.models.get(r.model)
        cost = usd_per_1k(model.cost, coll.price_per_hour) if model else None
        if cost is not None and cost > 0:
            points.append((r.task, r.model, model.role, cost, r.accuracy))
    return points


def _colors(points, before: str | None, after: str | None) -> dict[str, str]:
    """Teacher, student before and after in the headline's colours; others from the palette."""
    others, colors = iter(PALETTE), {}
    for _, label, role, _, _ in points:
        if label in colors:
            continue
        if role == "teacher":
            colors[label] = TEACHER
        elif label == before:
            colors[label] = BEFORE
        elif label == after:
            colors[label] = STUDENT
        else:
            colors[label] = next(others, MUTED)
    return colors


def _panel(ax, task, mine, colors, ends, log, limits) -> list[tuple]:
    """One task's panel: frontier, before -> after arrow, points; returns labels to place."""
    from matplotlib.ticker import PercentFormatter

    frontier, best = [], -1.0
    for p in mine:
        if p[4] > best:
            frontier.append(p)
            best = p[4]
    if len(frontier) > 1:
        ax.plot(
            [p[3] for p in frontier], [p[4] for p in frontier], ls="--", lw=1.1, color=MUTED,
            alpha=0.6, drawstyle="steps-post", zorder=1,
        )  # fmt: skip
    at = {p[1]: p for p in mine}
    before, after = ends
    if before in at and after in at:
        b, a = at[before], at[after]
        arrow = {"arrowstyle": "-|>", "color": STUDENT, "lw": 1.6, "shrinkA": 8, "shrinkB": 8}
        ax.annotate("", xy=(a[3], a[4]), xytext=(b[3], b[4]), zorder=2, arrowprops=arrow)
    todo = []
    for _, label, role, cost, acc in mine:
        teacher = role == "teacher"
        size = 320 if teacher else 110
        ax.scatter(
            cost, acc, s=size, marker="*" if teacher else "o", color=colors[label],
            edgecolor="white", linewidth=1.2, zorder=3,
        )  # fmt: skip
        todo.append((ax, f"{label}  {acc:.0%}", cost, acc, colors[label], size))
    (x0, x1), (y0, y1) = limits
    ax.set_xscale("log" if log else "linear")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.xaxis.set_major_formatter(_usd_formatter())
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_yticks([t for t in ax.get_yticks() if y0 - 1e-9 <= t <= min(y1, 1) + 1e-9])
    ax.set_xlabel("cost per 1,000 answers  (cheaper ←)", color=MUTED)
    ax.set_title(task)
    return todo


SPOTS = [
    (11, 7, "left", "bottom"),
    (11, -7, "left", "top"),
    (-11, 7, "right", "bottom"),
    (-11, -7, "right", "top"),
    (0, 13, "center", "bottom"),
    (0, -13, "center", "top"),
    (11, 22, "left", "bottom"),
    (11, -22, "left", "top"),
    (-11, 22, "right", "bottom"),
    (-11, -22, "right", "top"),
]
"""Where a point's label may go, in points from the point, tried in this order."""


def _place_labels(fig, todo) -> None:
    """Each label at the first spot beside its point that stays inside the panel and covers no
    other label or point (models with one cost and one accuracy would otherwise overprint)."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    taken = []
    for ax, _, cost, acc, _, size in todo:
        x, y = ax.transData.transform((cost, acc))
        r = math.sqrt(size) / 2 * fig.dpi / 72
        taken.append((ax, Bbox.from_extents(x - r, y - r, x + r, y + r)))
    for ax, text, cost, acc, color, _ in todo:

        def put(dx, dy, ha, va, ax=ax, text=text, cost=cost, acc=acc, color=color):
            return ax.annotate(
                text, (cost, acc), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                fontsize=9, color=color, fontweight="bold",
            )  # fmt: skip

        placed = None
        for spot in SPOTS:
            label = put(*spot)
            box = label.get_window_extent(renderer)
            inside = ax.bbox.x0 <= box.x0 and box.x1 <= ax.bbox.x1 and ax.bbox.y0 <= box.y0
            inside = inside and box.y1 <= ax.bbox.y1
            if inside and not any(a is ax and box.overlaps(b) for a, b in taken):
                placed = box
                break
            label.remove()
        if placed is None:  # nowhere free: the first spot, overlapping
            put(*SPOTS[0])
        else:
            taken.append((ax, placed))


def _padded(lo: float, hi: float, log: bool, pad: float = 0.15) -> tuple[float, float]:
    if log:
        a, b = math.log10(lo), math.log10(hi)
        span = max(b - a, 0.3)
        return 10 ** (a - pad * span), 10 ** (b + pad * span)
    span = max(hi - lo, 0.2 * hi)
    return max(0.0, lo - pad * span), hi + pad * span


def _usd_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: f"${x:,.2f}" if x >= 0.1 else f"${x:.3g}")
