"""What every `potstill` verb shares: the console and the --config / --set / --resume options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Require a checkpoint to continue from.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set train.lr=1e-5")
]
