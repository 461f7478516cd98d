"""`potstill rlt ...`: reinforcement-learned teachers (score, warmup, train, explain).

score and explain take arguments beyond --config/--set, so their commands are written here; all
four read their config class, run function and help from the table in `cli.verbs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from potstill.cli.options import ConfigOpt, SetOpt, console
from potstill.cli.stages import load_stage_config, run_verb
from potstill.cli.verbs import VERBS

rlt_app = typer.Typer(help="Reinforcement-learned teachers (Sakana AI RLT).", no_args_is_help=True)
CUSTOM = {"rlt_score", "rlt_explain"}


@rlt_app.command("score", help=VERBS["rlt_score"].help)
def rlt_score(
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher model spec.")],
    student: Annotated[str, typer.Option("--student", help="Student model spec.")],
    in_path: Annotated[
        Path, typer.Option("--in", help="Records with question/solution/explanation.")
    ],
    out_path: Annotated[Path, typer.Option("--out", help="Output .jsonl or .parquet.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    overrides = [*(set_ or []), f"teacher.name={teacher}", f"student.name={student}"]
    cfg = load_stage_config("rlt_score", config, overrides)
    VERBS["rlt_score"].run_function()(cfg, in_path, out_path, console)


@rlt_app.command("explain", help=VERBS["rlt_explain"].help)
def rlt_explain(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    select: Annotated[
        str | None,
        typer.Option("--select", help="all: every closed explanation; best: top RLT reward."),
    ] = None,
) -> None:
    run_verb("rlt_explain", config, [*(set_ or []), *([f"select={select}"] if select else [])])
