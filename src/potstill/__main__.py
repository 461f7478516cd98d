"""`python -m potstill` runs the CLI."""

from potstill.cli import run

run()
