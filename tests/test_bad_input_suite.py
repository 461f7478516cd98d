"""Bad inputs through the real CLI, one subprocess each: exit 2, exactly one line on stderr that
names the problem and its fix, no traceback, and the output directory (which already holds
earlier results) left as it was.

Failures that can only happen once a run is under way (HTTP errors, a full disk) leave the earlier
results byte for byte, write no partial file, and add a "failed" attempt to the run's manifest
and log: that record is the one change, so those two files are left out of the comparison.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from potstill.config import load_config
from potstill.data import write_records
from potstill.stages.generate import GenerateConfig, run_generate

from .distill_helpers import cli_args, config, make_teacher_dir, write_cache, write_data
from .fake_openai import fake_openai
from .test_bad_input_cli import tree_hash

RUN_RECORD = ("manifest.json", "logs/run.log")
"""What a run under way rewrites when it fails: its manifest and log gain a failed attempt."""


@dataclass
class Case:
    args: list[str]
    fragments: tuple[str, ...]
    env: dict = field(default_factory=dict)
    preexec: Callable[[], None] | None = None
    started: bool = False
    """The run was under way when it failed (see RUN_RECORD)."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir, other_vocab_dir):
    root = tmp_path_factory.mktemp("bad-input-assets")
    teacher = make_teacher_dir(root / "teacher")
    data = write_data(root / "data.jsonl", n=4)
    cfg = config(tiny_model_dir, teacher, data, root / "x")
    cache = write_cache(root / "cache", teacher, cfg, k=4)
    nan_cache = write_cache(root / "nan-cache", teacher, cfg, k=4, corrupt="r1")
    truncated = Path(shutil.copytree(cache, root / "truncated-cache"))
    shard = sorted(truncated.glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    no_weights = Path(shutil.copytree(tiny_model_dir, root / "no-weights"))
    (no_weights / "model.safetensors").unlink()
    corrupt = Path(shutil.copytree(tiny_model_dir, root / "corrupt-weights"))
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with fake_openai() as server:
        yield {
            "root": root,
            "student": tiny_model_dir,
            "teacher": teacher,
            "other": other_vocab_dir,
            "data": data,
            "cache": cache,
            "nan_cache": nan_cache,
            "truncated_cache": truncated,
            "no_weights": no_weights,
            "corrupt": corrupt,
            "server": server,
        }


def sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def generate_hf(d: Path, a: dict, source, *extra: str) -> list[str]:
    model = (f"model.name={a['student']}",)
    common = ("generation.max_new_tokens=4", "generation.system_prompt=null")
    out = f"run.output_dir={d}/run"
    return ["generate", *sets(*model, f"data.source={source}", *common, out, *extra)]


def sft(d: Path, a: dict, source, *extra: str) -> list[str]:
    return [
        "sft",
        *sets(
            f"model.name={a['student']}", "model.lora=null", f"data.source={source}",
            "data.system_prompt=null", "train.max_steps=1", "run.log_with=[]",
            f"run.output_dir={d}/run", *extra,
        ),
    ]  # fmt: skip


def distill(d: Path, a: dict, *extra: str, student=None, teacher=None, data=None) -> list[str]:
    return cli_args(
        student or a["student"], teacher or a["teacher"], data or a["data"], d / "run", *extra
    )


def offline(cache: Path) -> tuple[str, ...]:
    return ("--set", "teacher.mode=offline", "--set", f"teacher.cache={cache}")


def teacher_cache(d: Path, a: dict, source, *extra: str) -> list[str]:
    return [
        "teacher", "cache",
        *sets(
            f"teacher.name={a['teacher']}", f"data.source={source}", "data.system_prompt=null",
            "k=4", f"run.output_dir={d}/run", *extra,
        ),
    ]  # fmt: skip


def curate(d: Path, source, *extra: str) -> list[str]:
    return ["curate", *sets(f"data.source={source}", f"run.output_dir={d}/run", *extra)]


def rlt_score(d: Path, teacher, student, source, *extra: str) -> list[str]:
    return [
        "rlt", "score", "--teacher", str(teacher), "--student", str(student),
        "--in", str(source), "--out", str(d / "run" / "scored.jsonl"),
        *sets("teacher_system_prompt=null", "student_system_prompt=null", *extra),
    ]  # fmt: skip


EXPLAINED = [{"id": "a", "question": "What is 17 + 25?", "solution": "42", "explanation": "Add."}]


def openai_sets(d: Path, a: dict, **endpoint) -> list[str]:
    settings = {"api_key_env": "null", "max_retries": 1, "backoff": 0.01, "timeout": 5.0}
    settings.update(endpoint)
    return [
        "model.name=fake",
        f"data.source={d / 'questions.jsonl'}",
        "generation.max_new_tokens=8",
        "generation.system_prompt=null",
        "backend.kind=openai",
        f"backend.openai.base_url={a['server'].url}",
        *(f"backend.openai.{k}={v}" for k, v in settings.items()),
        f"run.output_dir={d / 'run'}",
    ]


def questions(n: int, size: int = 20) -> list[dict]:
    return [{"id": f"q{i}", "question": f"What is {i} + {i}? " + "x" * size} for i in range(n)]


def generate_openai(d: Path, a: dict, *, question_size: int = 20, **endpoint) -> list[str]:
    """An openai-backend generate run whose output holds 2 of its 4 records (the earlier
    results): a completed run, two records a shard, with its later shards removed, so the CLI run
    on the same input has work left when it fails. (Growing the input instead would be refused:
    a changed input is never resumed.)"""
    overrides = [*openai_sets(d, a, **endpoint), "generation.batch_size=2"]
    shutil.rmtree(d / "run")
    a["server"].mode = "ok"
    write_records(d / "questions.jsonl", questions(4, question_size))
    run_generate(load_config(GenerateConfig, overrides=overrides))
    for later in sorted((d / "run" / "samples").glob("part-*.jsonl"))[1:]:
        later.unlink()
    return ["generate", *sets(*overrides)]


def http_case(mode, fragments: tuple[str, ...], **endpoint):
    def make(d: Path, a: dict) -> Case:
        args = generate_openai(d, a, **endpoint)
        a["server"].mode = mode
        return Case(args, fragments, started=True)

    return make


def disk_full(d: Path, a: dict) -> Case:
    # Records of ~4 KiB each: the manifest (~1 KiB) still fits under the limit, a shard does not.
    args = generate_openai(d, a, question_size=4000)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), as ENOSPC would be
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))

    return Case(
        args,
        ("part-00001.jsonl: File too large", "free disk space"),
        preexec=limit_file_size,
        started=True,
    )


def api_key_missing(d: Path, a: dict) -> Case:
    args = ["generate", *sets(*openai_sets(d, a, api_key_env="POTSTILL_SUITE_NO_KEY"))]
    write_records(d / "questions.jsonl", questions(1))
    return Case(args, ("export POTSTILL_SUITE_NO_KEY=", "api_key_env: null"))


CASES: dict[str, Callable[[Path, dict], Case]] = {
    # records
    "malformed jsonl": lambda d, a: Case(
        generate_hf(d, a, write(d / "q.jsonl", '{"question": "a"}\n{"question": \n')),
        ("q.jsonl:2: malformed JSON",),
    ),
    "missing target field": lambda d, a: Case(
        sft(d, a, write(d / "q.jsonl", '{"id": "a", "question": "2 + 2?"}\n')),
        ("'completion'",),
    ),
    "wrongly typed field": lambda d, a: Case(
        generate_hf(d, a, write(d / "q.jsonl", '{"question": 5}\n')),
        ("q.jsonl:1: field 'question' must be a string, got int 5",),
    ),
    "extra field with a reserved name": lambda d, a: Case(
        curate(d, write(d / "s.jsonl", '{"question": "q", "completion": "c", "verified": "y"}\n')),
        ("s.jsonl:1: field 'verified' must be a boolean, got str 'y'",),
    ),
    "invalid utf-8": lambda d, a: Case(
        teacher_cache(d, a, write(d / "q.jsonl", b'{"question": "\xff", "completion": "4"}\n')),
        ("q.jsonl:1: invalid UTF-8 at byte 14",),
    ),
    "duplicate ids": lambda d, a: Case(
        distill(d, a, data=write(d / "q.jsonl", '{"id": "r", "question": "x"}\n' * 2)),
        ("duplicate id 'r'",),
    ),
    "empty input file": lambda d, a: Case(
        generate_hf(d, a, write(d / "q.jsonl", "\n")), ("empty dataset",)
    ),
    "missing input file": lambda d, a: Case(sft(d, a, d / "absent.jsonl"), ("absent.jsonl",)),
    # configs
    "yaml syntax error": lambda d, a: Case(
        ["distill", "-c", str(write(d / "c.yaml", "train: [1, 2\n"))],
        ("c.yaml:2:1: YAML syntax error",),
    ),
    "yaml not a mapping": lambda d, a: Case(
        ["generate", "-c", str(write(d / "c.yaml", "- model\n- data\n"))], ("c.yaml",)
    ),
    "unknown config key": lambda d, a: Case(
        generate_hf(d, a, a["data"], "generation.max_tokens=8"),
        ("generation.max_tokens: unknown key; did you mean 'generation.max_new_tokens'?",),
    ),
    "wrongly typed config value": lambda d, a: Case(
        sft(d, a, a["data"], "train.max_steps=ten"),
        ("train.max_steps: expected",),
    ),
    "--set without a value": lambda d, a: Case(["sft", "--set", "train.lr"], ("train.lr",)),
    "out-of-range top_p": lambda d, a: Case(
        generate_hf(d, a, a["data"], "generation.top_p=1.5"),
        ("generation.top_p: must be in (0, 1], got 1.5",),
    ),
    "out-of-range k": lambda d, a: Case(
        teacher_cache(d, a, a["data"], "k=0"), ("k: must be > 0, got 0",)
    ),
    "unknown divergence": lambda d, a: Case(
        distill(d, a, "--set", "loss.divergence=kl"), ("loss.divergence: 'kl' is not one of",)
    ),
    "unknown system prompt": lambda d, a: Case(
        generate_hf(d, a, a["data"], "generation.system_prompt=no_such_prompt"),
        ("no_such_prompt",),
    ),
    "resume without a checkpoint (sft)": lambda d, a: Case(
        sft(d, a, a["data"]) + ["--resume"], ("--resume: no checkpoint in",)
    ),
    "resume without a checkpoint (distill)": lambda d, a: Case(
        distill(d, a, "--resume"), ("--resume: no checkpoint in",)
    ),
    # models and caches
    "vocab mismatch (distill)": lambda d, a: Case(
        distill(d, a, teacher=a["other"]), ("teacher and student tokenizers differ",)
    ),
    "vocab mismatch (rlt score)": lambda d, a: Case(
        rlt_score(d, a["other"], a["student"], write_records(d / "in.jsonl", EXPLAINED)),
        ("teacher and student tokenizers differ",),
    ),
    "cache of another tokenizer": lambda d, a: Case(
        distill(d, a, *offline(a["cache"]), student=a["other"]), (str(a["cache"]),)
    ),
    "truncated cache shard": lambda d, a: Case(
        distill(d, a, *offline(a["truncated_cache"])), ("truncated",)
    ),
    "NaN in a cache": lambda d, a: Case(distill(d, a, *offline(a["nan_cache"])), ("'r1'", "NaN")),
    "missing model weights": lambda d, a: Case(
        generate_hf(d, a, a["data"], f"model.name={a['no_weights']}"),
        (f"{a['no_weights']} has no weights", "download or save the model again"),
    ),
    "corrupt safetensors": lambda d, a: Case(
        rlt_score(d, a["corrupt"], a["corrupt"], write_records(d / "in.jsonl", EXPLAINED)),
        (str(a["corrupt"]),),
    ),
    # runs under way
    "disk full": disk_full,
    "HTTP 429 on every try": http_case(429, ("HTTP 429", "after 2 tries", "lower concurrency")),
    "HTTP 500 on every try": http_case(500, ("HTTP 500 (fake status 500) after 2 tries",)),
    "endpoint timeout": http_case("slow", ("no answer within 0.5 s after 2 tries",), timeout=0.5),
    "API key variable unset": api_key_missing,
}


def assert_exactly_one_error_line(proc, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run_cli_in(case: Case):
    """`run_cli`, with the case's environment and a hook run in the child before exec."""
    env = {**os.environ, **case.env}
    env.pop("POTSTILL_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "potstill", *case.args],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=case.preexec,
        timeout=300,
    )


def run_hash(run: Path, started: bool) -> str:
    if not started:
        return tree_hash(run)
    kept = run.parent / "kept-for-hash"
    shutil.copytree(run, kept)
    for name in RUN_RECORD:
        (kept / name).unlink(missing_ok=True)
    try:
        return tree_hash(kept)
    finally:
        shutil.rmtree(kept)


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name, workdir, assets):
    case = CASES[name](workdir, assets)
    run = workdir / "run"
    before = run_hash(run, case.started)
    proc = run_cli_in(case)
    assert_exactly_one_error_line(proc, *case.fragments)
    assert run_hash(run, case.started) == before
    if case.started:
        attempts = json.loads((run / "manifest.json").read_text())["attempts"]
        assert [a["status"] for a in attempts] == ["completed", "failed"]
        assert "failed" in (run / "logs" / "run.log").read_text()
