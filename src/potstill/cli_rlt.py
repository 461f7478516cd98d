"""`potstill rlt ...`: reinforcement-learned teachers (score, warmup, train, explain)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from potstill.cli_options import ConfigOpt, ResumeOpt, SetOpt, console

rlt_app = typer.Typer(help="Reinforcement-learned teachers (Sakana AI RLT).", no_args_is_help=True)


@rlt_app.command("score")
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
    """Score explanations with the RLT reward (r^SS - lambda r^KL) for a student."""
    from potstill.config import load_config
    from potstill.rlt.score import RLTScoreConfig, run_score

    overrides = [*(set_ or []), f"teacher.name={teacher}", f"student.name={student}"]
    run_score(load_config(RLTScoreConfig, config, overrides), in_path, out_path, console)


@rlt_app.command("warmup")
def rlt_warmup(config: ConfigOpt = None, set_: SetOpt = None, resume: ResumeOpt = False) -> None:
    """Supervised warm-up of the teacher in its format (loss on the explanation only)."""
    from potstill.config import load_config
    from potstill.rlt.config import RLTWarmupConfig
    from potstill.rlt.warmup import run_warmup

    run_warmup(load_config(RLTWarmupConfig, config, set_ or []), console, resume=resume)


@rlt_app.command("train")
def rlt_train(config: ConfigOpt = None, set_: SetOpt = None, resume: ResumeOpt = False) -> None:
    """GRPO on the teacher with the RLT reward for a student; reruns resume."""
    from potstill.config import load_config
    from potstill.rlt.config import RLTTrainConfig
    from potstill.rlt.train import run_rlt_train

    run_rlt_train(load_config(RLTTrainConfig, config, set_ or []), console, resume=resume)


@rlt_app.command("explain")
def rlt_explain(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    select: Annotated[
        str | None,
        typer.Option("--select", help="all: every closed explanation; best: top RLT reward."),
    ] = None,
) -> None:
    """The teacher explains (question, solution) records, N each; --select best keeps the one
    that teaches the student best. Output: student training data; reruns resume."""
    from potstill.config import load_config
    from potstill.rlt.config import RLTExplainConfig
    from potstill.rlt.explain import run_explain

    overrides = [*(set_ or []), *([f"select={select}"] if select else [])]
    run_explain(load_config(RLTExplainConfig, config, overrides), console)
