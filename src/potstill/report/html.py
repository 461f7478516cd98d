"""The report page: one self-contained HTML file (inline CSS, plots as data URIs, no scripts).

Order follows the questions a reader asks: what did the student keep, at what cost (headline,
Pareto view); how did training go (curves); what did curation keep (funnel); what ran with which
settings (compute, settings).
"""

from __future__ import annotations

import re
from datetime import datetime
from html import escape

import potstill.report.plots as plots
from potstill.report.collect import Collection, Run
from potstill.report.pareto import pareto
from potstill.report.style import CSS
from potstill.report.summary import (
    Headline,
    ModelRow,
    all_rows,
    duration,
    key_settings,
    num,
    pct,
    run_cost,
    short_name,
    size,
    usd,
)


def render(coll: Collection, head: Headline) -> str:
    sections = [
        _header(coll),
        _missing(coll),
        _headline(coll, head),
        _pareto(coll, head),
        _training(coll),
        _curation(coll),
        _generation(coll),
        _compute(coll),
        _settings(coll),
    ]
    body = "\n".join(s for s in sections if s)
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>potstill report: {escape(_title(coll))}</title><style>{CSS}</style></head>"
        f"<body><main>\n{body}\n</main></body></html>\n"
    )


def _title(coll: Collection) -> str:
    return ", ".join(r.name for r in coll.roots) if len(coll.roots) > 1 else coll.roots[0].name


def _header(coll: Collection) -> str:
    kinds = {}
    for run in coll.runs:
        kinds[run.command] = kinds.get(run.command, 0) + 1
    stages = " · ".join(f"{n} {k}" if n > 1 else k for k, n in kinds.items())
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    roots = ", ".join(f"<code>{escape(str(r))}</code>" for r in coll.roots)
    return (
        "<header><div class='brand'>potstill report</div>"
        f"<h1>{escape(_title(coll))}</h1>"
        f"<p class='sub'>{len(coll.runs)} runs ({escape(stages)}) under {roots} · "
        f"generated {when}</p></header>"
    )


def _missing(coll: Collection) -> str:
    items = coll.all_missing()
    if not items:
        return ""
    lis = "".join(f"<li>missing: {escape(m)}</li>" for m in items)
    return (
        "<section class='missing'><h2>Incomplete</h2><p>The report shows what exists; these "
        f"parts are missing or partial:</p><ul>{lis}</ul></section>"
    )


def _card(row: ModelRow | None, title: str, kind: str, teacher: ModelRow | None) -> str:
    if row is None:
        return ""
    facts = [
        ("cost / 1k answers", usd(row.usd_per_1k)),
        ("speed", f"{num(row.tokens_per_s)} tok/s" if row.tokens_per_s else "—"),
        ("latency", f"{num(row.latency_s)} s" if row.latency_s else "—"),
        ("size", f"{size(row.params, '')} params" if row.params else "—"),
        ("disk · memory", f"{size(row.disk_bytes)} · {size(row.peak_memory_bytes)}"),
    ]
    rel = "<div class='rel'>&nbsp;</div>" if teacher else ""  # keeps the cards' rows aligned
    if teacher and row is not teacher and teacher.accuracy and row.accuracy is not None:
        rel = f"<div class='rel'>{pct(row.accuracy / teacher.accuracy)} of teacher</div>"
    elif row is teacher:
        rel = "<div class='rel'>reference</div>"
    dl = "".join(f"<dt>{k}</dt><dd>{escape(v)}</dd>" for k, v in facts)
    return (
        f"<div class='card {kind}'><div class='role'>{escape(title)}</div>"
        f"<div class='label'>{escape(row.label)} <span title='{escape(row.name)}'>"
        f"{escape(short_name(row.name))}</span></div>"
        f"<div class='big'>{pct(row.accuracy) if row.accuracy is not None else '—'}</div>"
        f"<div class='biglabel'>accuracy{f' (n={row.n})' if row.n else ''}</div>{rel}"
        f"<dl>{dl}</dl></div>"
    )


def _headline(coll: Collection, head: Headline) -> str:
    cards = [
        _card(head.teacher, "teacher", "teacher", head.teacher),
        _card(head.before, "student · before", "before", head.teacher),
        _card(head.after, "student · after", "after", head.teacher),
    ]
    if any(cards):
        tasks = ", ".join(head.tasks)
        stats = "".join(
            f"<div class='stat'><b>{value}</b>{what}</div>"
            for value, what, known in (
                (pct(head.kept), "of the teacher's accuracy", head.kept),
                (pct(head.cost_fraction), "of its cost per answer", head.cost_fraction),
                (f"{num(head.speedup, 2)}×", "the teacher's tokens/s", head.speedup),
                (pct(head.size_fraction), "of its parameters", head.size_fraction),
            )
            if known is not None
        )
        return (
            f"<section class='headline'><p class='lede'>{_inline_code(head.sentence())}</p>"
            f"<div class='stats'>{stats}</div><div class='cards'>{''.join(cards)}</div>"
            f"<p class='note'>Accuracy over {escape(tasks or 'all tasks')}; cost per 1,000 "
            f"answers at {_price(coll)}.</p></section>"
        )
    return (
        f"<section class='headline'><p class='lede'>{_inline_code(head.sentence())}</p>"
        f"<div class='cards'>{_pipeline_cards(coll)}</div></section>"
    )


def _inline_code(text: str) -> str:
    """Escape, then `x` → <code>x</code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def _price(coll: Collection) -> str:
    if coll.price_per_hour is None:
        return "no price given"
    return f"{usd(coll.price_per_hour)}/hour ({escape(coll.price_note)})"


def _pipeline_cards(coll: Collection) -> str:
    """Without an eval: what the pipeline has done so far, one card per stage."""
    cards = []
    for run in coll.of_kind("generate"):
        c = run.samples or run.counts
        cards.append(
            ("teacher samples", c.get("samples"), run, f"{c.get('completion_tokens', 0):,} tokens")
        )
    for run in coll.of_kind("curate"):
        kept = (run.funnel or {}).get("kept", {}).get("records", run.counts.get("kept_records"))
        start = (run.funnel or {}).get("input", {}).get("records", run.counts.get("input_records"))
        share = f"{pct(kept / start)} of {start}" if kept is not None and start else ""
        cards.append(("records kept", kept, run, share))
    for run in coll.training:
        loss = run.counts.get("final_loss")
        note = f"final loss {num(loss)}" if loss is not None else run.status
        cards.append(("training steps", run.counts.get("steps"), run, note))
    total = coll.total_seconds
    cost = total / 3600 * coll.price_per_hour if coll.price_per_hour is not None else None
    out = [
        f"<div class='card'><div class='role'>{escape(t)}</div><div class='big'>"
        f"{'—' if v is None else escape(f'{v:,}' if isinstance(v, int) else str(v))}</div>"
        f"<div class='biglabel'>{escape(note)}</div><div class='rel'>{escape(run.name)}</div></div>"
        for t, v, run, note in cards
    ]
    out.append(
        f"<div class='card'><div class='role'>compute</div><div class='big'>{duration(total)}</div>"
        f"<div class='biglabel'>{_money(cost, coll)}</div></div>"
    )
    return "".join(out)


def _cost_basis(coll: Collection) -> str:
    if coll.price_per_hour is None:
        return "no cost without a price per hour (eval.json's, or --price-per-hour)"
    return f"cost at {_price(coll)}"


def _money(cost: float | None, coll: Collection) -> str:
    if cost is None:
        return "no price: pass --price-per-hour"
    return f"{usd(cost)} at {_price(coll)}"


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return f"<p class='empty'>No data to plot for {escape(alt)}.</p>"
    return f"<figure><img src='{uri}' alt='{escape(alt)}'></figure>"


def _pareto(coll: Collection, head: Headline) -> str:
    if not coll.results:
        return ""
    rows = []
    by_label = {r.label: r for r in all_rows(coll)}
    kind = {head.before.label: "before"} if head.before else {}
    kind.update({head.after.label: "after"} if head.after else {})
    for r in sorted(coll.results, key=lambda r: (r.task, by_label[r.model].role != "teacher")):
        m = by_label[r.model]
        ks = ", ".join(f"pass@{k} {pct(v)}" for k, v in r.pass_at_k.items() if k != "1")
        ks += (", " if ks else "") + ", ".join(
            f"maj@{k} {pct(v)}" for k, v in r.maj_at_k.items() if k != "1"
        )
        rows.append(
            f"<tr><td><span class='dot {m.role} {kind.get(r.model, '')}'></span>"
            f"{escape(r.model)}</td>"
            f"<td>{escape(r.task)}</td><td class='n'>{r.n}×{r.samples}</td>"
            f"<td class='n'><b>{pct(r.accuracy)}</b></td><td>{escape(ks) or '—'}</td>"
            f"<td class='n'>{usd(m.usd_per_1k)}</td></tr>"
        )
    table = (
        "<table><thead><tr><th>model</th><th>task</th><th class='n'>questions×samples</th>"
        "<th class='n'>accuracy</th><th>pass@k · maj@k</th><th class='n'>$/1k answers</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return (
        "<section><h2>Accuracy vs cost</h2><p class='note'>Up and to the left is better. The "
        "dashed line is the Pareto frontier; the arrow goes from the student before distillation "
        f"to after.</p>{_img(pareto(coll, head), 'accuracy vs cost')}{table}</section>"
    )


def _status(run: Run) -> str:
    return f"<span class='pill {escape(run.status)}'>{escape(run.status)}</span>"


def _training(coll: Collection) -> str:
    runs = coll.training
    if not runs:
        return ""
    parts = ["<section><h2>Training</h2>"]
    for run in runs:
        c = run.counts
        facts = [
            f"{c['steps']} steps" if "steps" in c else None,
            f"final loss {num(c['final_loss'])}" if "final_loss" in c else None,
            f"{c['target_tokens']:,} target tokens" if "target_tokens" in c else None,
            f"wall time {duration(run.wall_s)}",
            f"≈ {usd(run_cost(run, coll.price_per_hour))}" if coll.price_per_hour else None,
            f"curves from {run.curves_source}" if run.curves_source else None,
        ]
        meta = " · ".join(escape(f) for f in facts if f)
        parts.append(
            f"<h3>{escape(run.name)} <small>{escape(run.command)}</small> {_status(run)}</h3>"
            f"<p class='meta'>{meta}</p>{_img(plots.curves(run), f'training curves of {run.name}')}"
        )
    return "".join(parts) + "</section>"


def _curation(coll: Collection) -> str:
    runs = coll.of_kind("curate")
    if not runs:
        return ""
    parts = ["<section><h2>Curation funnel</h2>"]
    for run in runs:
        meta = ""
        if run.funnel:
            f = run.funnel
            start, kept = f.get("input", {}), f.get("kept", {})
            reasons = (f.get("dropped") or {}).get("reasons") or {}
            why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
            share = kept.get("records", 0) / start["records"] if start.get("records") else None
            meta = (
                f"{start.get('records', '?')} records ({start.get('questions', '?')} questions) in,"
                f" {kept.get('records', '?')} kept ({pct(share)}) over "
                f"{kept.get('questions', '?')} questions; dropped: {why or 'none'}"
            )
        img = _img(plots.funnel(run.funnel), f"funnel of {run.name}") if run.funnel else ""
        parts.append(
            f"<h3>{escape(run.name)} {_status(run)}</h3><p class='meta'>{escape(meta)}</p>"
            + (img or "<p class='empty'>No funnel.json in this run.</p>")
        )
    return "".join(parts) + "</section>"


def _generation(coll: Collection) -> str:
    runs = coll.of_kind("generate")
    if not runs:
        return ""
    rows = []
    for run in runs:
        c = run.counts if run.counts.get("samples") is not None else (run.samples or {})
        source = "manifest" if c is run.counts else "counted from shards"
        model = key_settings(run).get("model", "—")
        tps = c.get("tokens_per_s")
        rows.append(
            f"<tr><td>{escape(run.name)} {_status(run)}</td><td>{escape(model)}</td>"
            f"<td class='n'>{c.get('samples', '—')}</td>"
            f"<td class='n'>{c.get('completion_tokens', 0):,}</td>"
            f"<td class='n'>{c.get('truncated', '—')}</td>"
            f"<td class='n'>{num(tps) if tps else '—'}</td>"
            f"<td class='n'>{duration(run.wall_s)}</td><td class='muted'>{source}</td></tr>"
        )
    return (
        "<section><h2>Teacher generation</h2><table><thead><tr><th>run</th><th>teacher</th>"
        "<th class='n'>samples</th><th class='n'>tokens</th><th class='n'>truncated</th>"
        "<th class='n'>tok/s</th><th class='n'>time</th><th>counts</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _compute(coll: Collection) -> str:
    rows, total_s = [], coll.total_seconds
    total_usd = total_s / 3600 * coll.price_per_hour if coll.price_per_hour is not None else 0.0
    for run in coll.runs:
        cost = run_cost(run, coll.price_per_hour)
        inside = coll.contains(run)
        holds = f"<br><span class='muted'>holds the {inside} runs below</span>" if inside else ""
        rows.append(
            f"<tr><td>{escape(run.name)}{holds}</td><td>{escape(run.command)}</td>"
            f"<td>{_status(run)}</td>"
            f"<td class='n'>{len(run.manifest.get('attempts') or [])}</td>"
            f"<td class='n'>{duration(run.wall_s)}</td><td class='n'>{usd(cost)}</td></tr>"
        )
    total = usd(total_usd) if coll.price_per_hour is not None else "—"
    return (
        f"<section><h2>Compute</h2><p class='note'>Time each stage worked (manifest timings, "
        f"else its attempts); {_cost_basis(coll)}.</p><table><thead><tr><th>run</th>"
        "<th>stage</th><th>status</th><th class='n'>attempts</th><th class='n'>time</th>"
        f"<th class='n'>cost</th></tr></thead><tbody>{''.join(rows)}</tbody><tfoot><tr>"
        f"<td colspan='4'>total{_once if any(coll.contains(r) for r in coll.runs) else ''}</td>"
        f"<td class='n'>{duration(total_s)}</td>"
        f"<td class='n'>{total}</td></tr></tfoot></table></section>"
    )


_once = " (a run holding others counted once)"


def _settings(coll: Collection) -> str:
    rows = []
    for run in coll.runs:
        settings = key_settings(run)
        chips = "".join(
            f"<span class='kv'><i>{escape(k)}</i> {escape(v)}</span>" for k, v in settings.items()
        )
        full = (
            f"<details><summary>config.yaml</summary><pre>{escape(run.config_text)}</pre></details>"
            if run.config_text
            else "<span class='muted'>no config.yaml</span>"
        )
        created = escape(run.created.replace("T", " ")[:16])
        rows.append(
            f"<tr><td><b>{escape(run.name)}</b><br><span class='muted'>{escape(run.command)} · "
            f"{created}</span></td><td>{chips or '—'}{full}</td></tr>"
        )
    return (
        "<section><h2>Settings</h2><table class='settings'><thead><tr><th>run</th>"
        f"<th>key settings</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )
