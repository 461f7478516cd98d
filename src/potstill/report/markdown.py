"""`report.md`: the report's numbers as a short Markdown summary (the plots are in the HTML)."""

from __future__ import annotations

from potstill.report.collect import Collection
from potstill.report.summary import (
    Headline,
    all_rows,
    duration,
    key_settings,
    num,
    pct,
    run_cost,
    size,
    usd,
)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def render_markdown(coll: Collection, head: Headline, html_name: str) -> str:
    title = ", ".join(r.name for r in coll.roots)
    out = [f"# potstill report: {title}", "", f"**{head.sentence()}**", ""]
    missing = coll.all_missing()
    if missing:
        out += ["## Missing", "", *(f"- missing: {m}" for m in missing), ""]
    out += _models_section(coll)
    for run in coll.training:
        out += _training_section(run, coll)
    for run in coll.of_kind("curate"):
        out += _curation_section(run)
    for run in coll.of_kind("generate"):
        c = run.counts if run.counts.get("samples") is not None else (run.samples or {})
        out += [
            f"## Generation: {run.name} ({run.status})",
            "",
            f"- {c.get('samples', '?')} samples, {c.get('completion_tokens', 0):,} tokens, "
            f"{c.get('truncated', '?')} truncated, {num(c.get('tokens_per_s'))} tok/s, "
            f"{duration(run.wall_s)}",
            "",
        ]
    out += ["## Runs", "", f"Total working time {duration(coll.total_seconds)}.", ""]
    out += _table(
        ["run", "stage", "status", "time", "cost", "key settings"],
        [
            [
                r.name,
                r.command,
                r.status,
                duration(r.wall_s),
                usd(run_cost(r, coll.price_per_hour)),
                ", ".join(f"{k}={v}" for k, v in key_settings(r).items()),
            ]
            for r in coll.runs
        ],
    )
    out += ["", f"Plots and full configs: [{html_name}]({html_name})", ""]
    return "\n".join(out)


def _models_section(coll: Collection) -> list[str]:
    rows = all_rows(coll)
    if not rows:
        return []
    out: list[str] = []
    out += ["## Models", ""]
    out += _table(
        ["model", "role", "accuracy", "$/1k answers", "tok/s", "latency", "params", "disk"],
        [
            [
                r.label,
                r.role,
                pct(r.accuracy),
                usd(r.usd_per_1k),
                num(r.tokens_per_s),
                f"{num(r.latency_s)} s" if r.latency_s else "—",
                size(r.params, ""),
                size(r.disk_bytes),
            ]
            for r in rows
        ],
    )
    out += ["", "Results per task:", ""]
    out += _table(
        ["model", "task", "n", "samples", "accuracy"],
        [[r.model, r.task, str(r.n), str(r.samples), pct(r.accuracy)] for r in coll.results],
    )
    out.append("")
    return out


def _training_section(run, coll: Collection) -> list[str]:
    out: list[str] = []
    c = run.counts
    facts = [
        f"{k} {num(c[k]) if isinstance(c[k], float) else c[k]}"
        for k in ("steps", "final_loss", "target_tokens")
        if k in c
    ]
    last = {tag: pts[-1][1] for tag, pts in run.curves.items() if pts}
    tail = ", ".join(f"{k} {num(v)}" for k, v in last.items())
    out += [
        f"## Training: {run.name} ({run.command}, {run.status})",
        "",
        f"- {', '.join(facts) or 'no counts'}; wall time {duration(run.wall_s)}"
        + (f", ≈ {usd(run_cost(run, coll.price_per_hour))}" if coll.price_per_hour else ""),
        f"- last logged values: {tail or 'none'}"
        + (f" (from {run.curves_source})" if run.curves_source else ""),
        "",
    ]
    return out


def _curation_section(run) -> list[str]:
    out: list[str] = []
    out += [f"## Curation: {run.name} ({run.status})", ""]
    if run.funnel:
        f = run.funnel
        out += _table(
            ["step", "records", "questions", "dropped"],
            [
                [
                    s.get("name", "?"),
                    f"{s.get('records_in')} → {s.get('records_out')}",
                    f"{s.get('questions_in')} → {s.get('questions_out')}",
                    ", ".join(f"{k} {v}" for k, v in (s.get("reasons") or {}).items()),
                ]
                for s in f.get("steps") or []
            ],
        )
        kept, start = f.get("kept", {}), f.get("input", {})
        out.append(f"\nKept {kept.get('records')} of {start.get('records')} records.")
    out.append("")
    return out
