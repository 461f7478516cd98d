"""`compare.html`: the method comparison as one self-contained page — held-out accuracy against
the compute each method spent, one panel per kind of held-out set, then the full table.

Accuracy on a kind pools its sets' questions (n is their sum; the standard error is
sqrt(p (1 − p) / n)). Compute is wall-clock seconds on the run's machine: the method's training
(its sampling and teacher forwards included) plus the teacher work it needed (the traces every
method starts from; the top-k cache for `logit`). The untrained student sits at 0.
"""

from __future__ import annotations

from html import escape

import potstill.report.plots as plots
from potstill.eval.compare import NOISE_Z, stderr
from potstill.report.style import CSS

KINDS = ("in_distribution", "rephrased", "other_family")
KIND_TITLES = {
    "in_distribution": "trained task, new questions",
    "rephrased": "same problems, reworded",
    "other_family": "families never trained on",
}
BASELINE, TEACHER = "student (before)", "teacher"


def pooled(table: dict, model: str, kind: str, variant: str) -> dict | None:
    """{accuracy, n, stderr} of `model` over every set of `kind` in `variant`, or None."""
    row = next((r for r in table["rows"] if r["model"] == model), None)
    if row is None:
        return None
    cells = [
        row["cells"].get(f"{c['set']}/{c['variant']}")
        for c in table["columns"]
        if c["kind"] == kind and c["variant"] == variant
    ]
    cells = [c for c in cells if c]
    n = sum(c["n"] for c in cells)
    if not n:
        return None
    p = sum(c["correct"] for c in cells) / n
    return {"accuracy": p, "n": n, "stderr": stderr(p, n)}


def method_seconds(table: dict, row: dict) -> float | None:
    """The compute a method's student cost, in seconds (see the module docstring)."""
    training = row.get("training")
    if not training:
        return None
    teacher = table["teacher_compute"]
    extra = teacher.get("cache_s", 0.0) if row["model"] in ("logit", "logit_soft") else 0.0
    return training["seconds"] + teacher.get("traces_s", 0.0) + extra


def accuracy_vs_compute(table: dict) -> str | None:
    """The figure: a panel per kind; filled markers with the training prompt, hollow without."""
    kinds = [k for k in KINDS if any(c["kind"] == k for c in table["columns"])]
    variants = sorted({c["variant"] for c in table["columns"]}, key=lambda v: v != "with_prompt")
    if not kinds:
        return None
    import matplotlib.pyplot as plt

    with plots.style():
        fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds), 3.3), squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            _panel(ax, table, kind, variants)
        axes[0][0].set_ylabel("held-out accuracy")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6))
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        return plots.to_data_uri(fig)


def _panel(ax, table: dict, kind: str, variants: list[str]) -> None:
    points = [(BASELINE, 0.0)] + [
        (r["model"], method_seconds(table, r))
        for r in table["rows"]
        if r["model"] not in (TEACHER, BASELINE)
    ]
    for i, (model, seconds) in enumerate(points):
        colour = plots.BEFORE if model == BASELINE else plots.PALETTE[i % len(plots.PALETTE)]
        for variant in variants:
            acc = pooled(table, model, kind, variant)
            if acc is None or seconds is None:
                continue
            filled = variant == "with_prompt"
            ax.errorbar(
                seconds, acc["accuracy"], yerr=acc["stderr"], fmt="o", color=colour,
                markerfacecolor=colour if filled else "white", capsize=3, markersize=7,
                label=model if filled else None,
            )  # fmt: skip
    for variant in variants:
        teacher = pooled(table, TEACHER, kind, variant)
        if teacher is not None:
            style = "--" if variant == "with_prompt" else ":"
            label = "teacher" if variant == "with_prompt" else None
            ax.axhline(teacher["accuracy"], color=plots.TEACHER, ls=style, lw=1.2, label=label)
    ax.set_title(KIND_TITLES[kind])
    ax.set_xlabel("compute (s on this machine)")
    ax.set_ylim(-0.03, 1.03)
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")


def _cell(cell: dict | None) -> str:
    if not cell:
        return "<td class='n'>—</td>"
    mark = (
        " <span class='muted' title='inside the noise'>~</span>" if cell.get("inside_noise") else ""
    )
    return f"<td class='n'>{cell['accuracy']:.1%} ± {cell['stderr']:.1%}{mark}</td>"


def _table(table: dict) -> str:
    heads = "".join(
        f"<th>{escape(c['set'])}<br><small>{escape(c['kind'].replace('_', ' '))}, "
        f"{escape(c['variant'].replace('_', ' '))}</small></th>"
        for c in table["columns"]
    )
    rows = []
    for row in table["rows"]:
        t = row.get("training") or {}
        seconds = method_seconds(table, row)
        compute = f"{seconds:.0f} s" if seconds is not None else "—"
        if row.get("failed"):
            compute = f"<span class='pill failed'>failed</span> {escape(row['failed'][:80])}"
        cells = "".join(
            _cell(row["cells"].get(f"{c['set']}/{c['variant']}")) for c in table["columns"]
        )
        rows.append(
            f"<tr><td>{escape(row['model'])}</td><td class='n'>{t.get('steps', '—')}</td>"
            f"<td class='n'>{t.get('tokens', '—')}</td><td class='n'>{compute}</td>{cells}</tr>"
        )
    return (
        "<table><thead><tr><th>model</th><th>steps</th><th>train tokens</th><th>compute</th>"
        f"{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def render_compare(table: dict, title: str) -> str:
    """The page's HTML; `table` is what `compare_table` returns (compare.json)."""
    figure = accuracy_vs_compute(table)
    b = table["budget"]
    img = (
        f"<figure><img src='{figure}' alt='held-out accuracy against compute, per method'></figure>"
        if figure
        else "<p class='empty'>no held-out results yet</p>"
    )
    body = (
        f"<header><div class='brand'>potstill compare</div><h1>{escape(title)}</h1>"
        f"<p class='sub'>Every method trains the same student for {b['max_steps']} optimizer "
        f"steps of {b['micro_batch_size']} × {b['grad_accum']} sequences.</p></header>"
        "<section><h2>Held-out accuracy against compute</h2>"
        "<p class='note'>Filled: with the training system prompt; hollow: without. Bars are one "
        "standard error over the kind's pooled questions; dashed: the teacher.</p>"
        f"{img}</section><section><h2>Every set</h2>{_table(table)}"
        "<p class='note'>~ marks a difference from the untrained student inside the noise "
        f"(less than {NOISE_Z:g} combined standard errors).</p></section>"
    )
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>potstill compare: {escape(title)}</title><style>{CSS}</style></head>"
        f"<body><main>\n{body}\n</main></body></html>\n"
    )
