"""The CLI's last resort: an exception that is not a PotstillError is a bug in potstill (or in a
library under it), not a problem with the user's input. It still ends in one line, exit 1, which
names the exception and says how to get the traceback, instead of a screenful of frames."""

from __future__ import annotations

import sys

INTERNAL_ERROR = 1
MAX_DETAIL = 300


def internal_error(exc: BaseException) -> int:
    """Print `error: internal error (Type: message); ...` on stderr and return exit code 1."""
    detail = " ".join(str(exc).split())  # one line, whatever the exception's message holds
    detail = detail.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    if len(detail) > MAX_DETAIL:
        detail = detail[: MAX_DETAIL - 3] + "..."
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    print(
        f"error: internal error ({what}); rerun with POTSTILL_DEBUG=1 for the traceback and "
        "report it",
        file=sys.stderr,
    )
    return INTERNAL_ERROR
