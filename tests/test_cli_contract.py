"""The CLI's error contract, for every verb: bad input is exit 2 and exactly one `error: ` line on
stderr; anything else that goes wrong (a bug) is exit 1 and one `error: internal error (...)`
line; a traceback only with POTSTILL_DEBUG=1.

The cases are generated from each verb's config (its first integer field gets text, its first
float NaN, its first section an unknown key, plus a config file that is not there). Every verb x
every kind runs through `potstill.cli.app.main` in process; each start of the real CLI costs
seconds of torch import, so the subprocess part gives every verb one of the kinds (rotating) and
the missing file (which fails before the stage is imported), and the internal failures.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typer

from potstill.cli.app import app, main
from potstill.cli.errors import internal_error
from potstill.cli.verbs import VERBS

from .config_walk import section_of, walk
from .conftest import assert_one_line_error, run_cli, run_in_group

KINDS = ("wrong type", "out of range", "unknown key", "missing config")
INTERNAL = re.compile(
    r"error: internal error \((\w+): (.*)\); rerun with POTSTILL_DEBUG=1 for the traceback and "
    r"report it"
)


def cases(key: str) -> dict[str, tuple[list[str], str]]:
    """kind -> (CLI arguments after the verb's words, what the error line must hold)."""
    leaves = [leaf for _, leaf in walk(VERBS[key].config_class()) if leaf.overridable]
    integer = next(leaf.dotted for leaf in leaves if leaf.tp is int)
    number = next(leaf.dotted for leaf in leaves if leaf.tp is float)
    section = next(leaf.dotted for leaf in leaves if section_of(leaf.tp) == (leaf.tp, False))
    return {
        "wrong type": (["--set", f"{integer}=twelve"], f"{integer}: expected an integer"),
        "out of range": (["--set", f"{number}=.nan"], f"{number}: "),
        "unknown key": (["--set", f"{section}.no_such_key=1"], f"{section}.no_such_key: unknown"),
        "missing config": (["--config", "no/such.yaml"], "config file not found: no/such.yaml"),
    }


def required(words: tuple[str, ...]) -> list[str]:
    """A placeholder for each option the command requires (rlt score's --teacher, --in...)."""
    command = typer.main.get_command(app)
    for word in words:
        command = command.commands[word]
    return [arg for p in command.params if p.required and p.opts for arg in (p.opts[0], "x")]


def argv(key: str, kind: str) -> tuple[list[str], str]:
    args, fragment = cases(key)[kind]
    words = VERBS[key].command
    return [*words, *required(words), *args], fragment


@pytest.fixture
def keep_sigterm():
    """main() makes SIGTERM stop like Ctrl-C; give pytest its own handler back."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.mark.parametrize("key", list(VERBS))
def test_every_kind_of_bad_input_is_one_line_exit_2_in_process(
    key, capsys, monkeypatch, keep_sigterm
):
    monkeypatch.delenv("POTSTILL_DEBUG", raising=False)
    for kind in KINDS:
        args, fragment = argv(key, kind)
        code = main(args)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert (code, len(lines)) == (2, 1), (kind, code, err)
        assert lines[0].startswith("error: ") and fragment in lines[0], (kind, lines[0])


def test_the_real_cli_keeps_the_contract_for_every_verb(tmp_path):
    """One process per case, two at a time: each verb with one kind (rotating over the three
    that import the stage) and with a missing config file."""
    jobs = []
    for i, key in enumerate(VERBS):
        jobs += [argv(key, KINDS[i % 3]), argv(key, "missing config")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda job: run_cli(*job[0], cwd=tmp_path), jobs))
    for (args, fragment), proc in zip(jobs, procs, strict=True):
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert_one_line_error(proc, fragment)
    assert not any(tmp_path.iterdir()), "a refused run wrote something"


FAULT = """
import sys
import potstill.cli.stages as stages
def boom(*args, **kwargs):
    raise RuntimeError("injected fault\\nsecond line \\udc80")
stages.load_stage_config = boom
sys.argv[0] = "potstill"
from potstill.cli.app import run
run()
"""
"""The CLI with a bug planted where every stage verb starts (the real entry point, `run`)."""


def run_with_fault(*args: str, debug: bool, cwd: Path):
    env = {k: v for k, v in os.environ.items() if k != "POTSTILL_DEBUG"}
    if debug:
        env["POTSTILL_DEBUG"] = "1"
    return run_in_group([sys.executable, "-c", FAULT, *args], cwd=cwd, env=env, timeout=120)


def test_an_internal_error_is_one_line_exit_1_and_a_traceback_only_when_debugging(tmp_path):
    proc = run_with_fault("sft", debug=False, cwd=tmp_path)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    match = INTERNAL.fullmatch(lines[0])
    assert match, lines[0]
    assert match.groups() == ("RuntimeError", "injected fault second line \\udc80")

    debug = run_with_fault("sft", debug=True, cwd=tmp_path)
    assert debug.returncode == 1, debug.stderr
    assert "Traceback" in debug.stderr and "RuntimeError: injected fault" in debug.stderr


def test_a_data_source_holding_a_directory_is_never_a_traceback(tmp_path):
    """data.source a directory whose part-0.jsonl is itself a directory: open() fails with
    IsADirectoryError inside the reader. Whether that becomes an input error (exit 2) or stays
    an internal one (exit 1), it is one line."""
    (tmp_path / "src" / "part-0.jsonl").mkdir(parents=True)
    proc = run_cli(
        "curate", "--set", f"data.source={tmp_path / 'src'}",
        "--set", f"run.output_dir={tmp_path / 'out'}", cwd=tmp_path,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "part-0.jsonl" in lines[0], lines[0]
    assert proc.returncode == 2 or (proc.returncode == 1 and INTERNAL.fullmatch(lines[0]))


def test_internal_error_line_is_one_printable_line(capsys):
    code = internal_error(RuntimeError("a\r\nb\udc80" + "x" * 1000))
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.splitlines()) == 1
    err.encode("utf-8")
    match = INTERNAL.fullmatch(err.strip())
    assert match and match.group(1) == "RuntimeError", err
    assert match.group(2).startswith("a b\\udc80xxx") and match.group(2).endswith("...")
    assert len(match.group(2)) == 300
