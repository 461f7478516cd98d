"""Source specs that name several sources: a mixture `A + B + ...` (see potstill.data.sources)."""

from __future__ import annotations

from pathlib import Path

from potstill.errors import DataError

MIX = " + "
"""What joins the sources of a mixture."""


def mixture_parts(spec: str) -> list[str]:
    """The sources of a mixture `A + B + ...`, or [spec] for one source (a path that exists is
    one source, whatever its name)."""
    if MIX not in spec or Path(spec).expanduser().exists():
        return [spec]
    parts = [part.strip() for part in spec.split(MIX)]
    if not all(parts):
        raise DataError(f"{spec}: a mixture has an empty part; write SOURCE + SOURCE")
    return parts
