"""Where potstill keeps its caches: `$POTSTILL_HOME`, default the user's cache dir."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    """The root of potstill's caches (converted models, downloads, locks)."""
    env = os.environ.get("POTSTILL_HOME")
    root = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("potstill"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(kind: str) -> Path:
    """A sub-directory of `home()`: "models", "tokenizers", "downloads", "converted", "locks"
    or "tmp"."""
    path = home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
