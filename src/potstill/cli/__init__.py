"""The `potstill` command (see `cli.app`); `run` is the console-script entry point."""

from potstill.cli.app import app, main, run

__all__ = ["app", "main", "run"]
