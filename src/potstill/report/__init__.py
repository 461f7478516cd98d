"""`potstill report`: one self-contained HTML page (and a Markdown summary) over run directories.

    potstill report runs/gsm [more dirs...] [--out report.html] [--price-per-hour 0.10]

The page answers first how much of the teacher's accuracy the student kept, at what fraction of
the cost; then shows training curves, the curation funnel, compute and every run's settings. A
partial input still gets a report, with what is missing listed on the page and on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from potstill.errors import ConfigError
from potstill.fsutil import atomic_write_text
from potstill.report.collect import Collection, collect


def write_report(
    paths: list[Path], out: Path | None = None, *, price_per_hour: float | None = None
) -> Path:
    """Write `report.html` (default: in the first path) and `report.md` beside it; return the
    HTML path. Missing parts are listed in the report and printed to stderr as `missing: ...`."""
    from potstill.report.html import render
    from potstill.report.markdown import render_markdown
    from potstill.report.summary import headline

    if price_per_hour is not None and price_per_hour < 0:
        raise ConfigError(f"--price-per-hour must be >= 0, got {price_per_hour}")
    coll = collect([Path(p) for p in paths], price_per_hour=price_per_hour)
    if out is None:
        first = Path(paths[0])
        out = (first.parent if first.is_file() else first) / "report.html"
    out = Path(out)
    if out.is_dir():
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    head = headline(coll)
    atomic_write_text(out, render(coll, head))
    atomic_write_text(out.with_suffix(".md"), render_markdown(coll, head, out.name))
    for line in coll.all_missing():
        print(f"missing: {line}", file=sys.stderr)
    return out


__all__ = ["Collection", "collect", "write_report"]
