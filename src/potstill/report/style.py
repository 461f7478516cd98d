"""The report page's stylesheet, inlined into the HTML so the file works offline on its own."""

CSS = """
:root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#f8fafc; --teacher:#7c3aed;
  --before:#94a3b8; --after:#0d9488; --warn:#b45309; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  "DejaVu Sans", sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 36px 28px 64px; }
header .brand { font-size: 12px; letter-spacing: .12em; text-transform: uppercase;
  color: var(--after); font-weight: 700; }
h1 { font-size: 30px; margin: 4px 0 2px; letter-spacing: -.01em; }
h2 { font-size: 19px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 22px 0 2px; }
h3 small { color: var(--muted); font-weight: 500; margin-left: 4px; }
.sub, .note, .meta, .muted { color: var(--muted); }
.sub { margin: 0 0 22px; font-size: 13.5px; }
.note { font-size: 13px; margin: 2px 0 10px; }
.meta { font-size: 13.5px; margin: 2px 0 8px; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, "DejaVu Sans Mono", monospace;
  background: #eef2f7; padding: 1px 5px; border-radius: 4px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 12px;
  padding: 22px 24px; margin: 18px 0; box-shadow: 0 1px 2px rgba(0,0,0,.03); }
section.missing { background: #fffbeb; border-color: #fcd34d; padding: 14px 22px; }
section.missing h2 { color: var(--warn); font-size: 15px; margin: 0 0 4px; }
section.missing p { margin: 0 0 4px; font-size: 13.5px; }
section.missing ul { margin: 0; padding-left: 20px; font-size: 13.5px; }
.lede { font-size: 21px; line-height: 1.4; font-weight: 600; margin: 0 0 14px;
  letter-spacing: -.005em; }
.lede code { font-size: 18px; padding: 1px 6px; }
.stats { display: flex; flex-wrap: wrap; gap: 8px 36px; margin: 0 0 16px; }
.stat { color: var(--muted); font-size: 13.5px; }
.stat b { display: block; font-size: 34px; line-height: 1.1; color: var(--after); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 14px; }
.card { border: 1px solid var(--line); border-top: 4px solid var(--before); border-radius: 10px;
  padding: 14px 16px; background: #fff; }
.card.teacher { border-top-color: var(--teacher); }
.card.after { border-top-color: var(--after); }
.card .role { font-size: 11.5px; text-transform: uppercase; letter-spacing: .08em;
  color: var(--muted); font-weight: 700; }
.card .label { font-weight: 600; margin-top: 2px; }
.card .label span { display: block; font-weight: 400; color: var(--muted); font-size: 12.5px; }
.card .big { font-size: 38px; font-weight: 700; line-height: 1.15; margin-top: 8px;
  font-variant-numeric: tabular-nums; }
.card.teacher .big { color: var(--teacher); }
.card.after .big { color: var(--after); }
.card .biglabel { color: var(--muted); font-size: 12.5px; }
.card .rel { font-size: 12.5px; font-weight: 600; color: var(--ink); margin-top: 2px; }
.card dl { display: grid; grid-template-columns: auto 1fr; gap: 3px 10px; margin: 12px 0 0;
  font-size: 13px; border-top: 1px solid var(--line); padding-top: 10px; }
.card dt { color: var(--muted); }
.card dd { margin: 0; text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 8px 0 6px; }
figure img { display: block; width: 100%; height: auto; }
.empty { color: var(--muted); font-style: italic; }
table { width: 100%; border-collapse: collapse; font-size: 13.5px; margin-top: 10px; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: 12px;
  text-transform: uppercase; letter-spacing: .05em; border-bottom: 2px solid var(--line);
  padding: 6px 8px; }
td { border-bottom: 1px solid var(--line); padding: 7px 8px; vertical-align: top; }
tfoot td { font-weight: 700; border-bottom: none; }
.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 7px;
  background: var(--after); }
.dot.teacher { background: var(--teacher); }
.dot.before { background: var(--before); }
.pill { display: inline-block; font-size: 11px; font-weight: 600; padding: 1px 8px;
  border-radius: 999px; background: #dcfce7; color: #166534; vertical-align: 2px; }
.pill.interrupted, .pill.running, .pill.unknown { background: #fef3c7; color: #92400e; }
.pill.failed { background: #fee2e2; color: #991b1b; }
.kv { display: inline-block; background: #f1f5f9; border-radius: 6px; padding: 1px 8px;
  margin: 0 6px 5px 0; font-size: 12.5px; }
.kv i { color: var(--muted); font-style: normal; margin-right: 3px; }
details { margin-top: 2px; }
summary { cursor: pointer; color: var(--after); font-size: 12.5px; }
pre { font: 12px/1.45 ui-monospace, SFMono-Regular, Menlo, "DejaVu Sans Mono", monospace;
  background: #f8fafc; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px;
  overflow-x: auto; max-height: 420px; }
table.settings td:first-child { width: 230px; }
table.settings td:first-child .muted { white-space: nowrap; }
@media print { body { background: #fff; } section { break-inside: avoid; box-shadow: none; } }
"""
