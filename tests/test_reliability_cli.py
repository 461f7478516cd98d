"""The hostile user's inputs through the real CLI (see test_reliability.py for the in-process
side), one subprocess each: exit 2, exactly one line on stderr, no traceback. A refusal up front
leaves the output directory as it was; a failure under way (an endpoint's answer, a full disk, a
broken checkpoint) records a failed attempt and leaves no half-written file."""

from __future__ import annotations

import json
import resource
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from potstill.config import load_config
from potstill.data import write_records
from potstill.stages.sft import SFTConfig, run_sft

from .fake_openai import fake_openai
from .test_bad_input_cli import tree_hash
from .test_bad_input_suite import (
    Case,
    assert_exactly_one_error_line,
    curate,
    generate_hf,
    openai_sets,
    questions,
    run_cli_in,
    sets,
    write,
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("reliability-assets")
    # A model whose generation_config sets sampling flags without do_sample: transformers warns
    # about them on every load, a line that must not join a refusal on stderr.
    chatty = Path(shutil.copytree(tiny_model_dir, root / "chatty"))
    generation = json.loads((chatty / "generation_config.json").read_text())
    generation.update(do_sample=False, temperature=0.5, top_p=0.3)
    (chatty / "generation_config.json").write_text(json.dumps(generation))
    data = write_records(root / "data.jsonl", [{"id": "a", "question": "2+2?", "completion": "4"}])
    with fake_openai() as server:
        yield {"student": tiny_model_dir, "chatty": chatty, "data": data, "server": server}


def sft_settings(d: Path, a: dict, source, *extra: str) -> list[str]:
    return [
        f"model.name={a['student']}", "model.lora=null", f"data.source={source}",
        "data.system_prompt=null", "train.max_steps=1", "run.log_with=[]",
        f"run.output_dir={d}/run", *extra,
    ]  # fmt: skip


def eval_labels(d: Path, a: dict) -> Case:
    model = f"name: '{a['student']}'"
    models = f"models=[{{{model}, label: student/a}}, {{{model}, label: student-a}}]"
    args = ["eval", *sets(models, "generation.max_new_tokens=2", f"run.output_dir={d}/run")]
    return Case(args, ("models: labels 'student/a' and 'student-a' share the answers folder",))


def endpoint_content(d: Path, a: dict) -> Case:
    write_records(d / "questions.jsonl", questions(2))
    a["server"].content = 42
    return Case(
        ["generate", *sets(*openai_sets(d, a, max_retries=0))],
        (f"{a['server'].url}/chat/completions answered a message content that is not text "
         "(int 42)",),
        started=True,
    )  # fmt: skip


def checkpoint_disk_full(d: Path, a: dict) -> Case:
    def limit_file_size():  # the tiny model's weights are 160 kB: its checkpoint cannot fit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    return Case(
        ["sft", *sets(*sft_settings(d, a, a["data"]))],
        (f"cannot write {d}/run/checkpoints/.tmp-step-000001/trainable.safetensors: File too "
         "large", "free disk space"),
        preexec=limit_file_size,
        started=True,
    )  # fmt: skip


def truncated_checkpoint(d: Path, a: dict) -> Case:
    shutil.rmtree(d / "run")
    settings = sft_settings(d, a, a["data"])
    run_sft(load_config(SFTConfig, None, settings))
    weights = d / "run" / "checkpoints" / "step-000001" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return Case(
        ["sft", *sets(*settings)],
        (f"{weights.parent}: unreadable checkpoint (SafetensorError: ",
         "delete this step directory to resume from the one before"),
        started=True,
    )  # fmt: skip


def bad_manifest(d: Path, a: dict) -> Case:
    write(d / "run" / "manifest.json", "[1, 2]")
    return Case(
        generate_hf(d, a, a["data"], "generation.max_new_tokens=2"),
        (f"{d}/run/manifest.json: not a manifest potstill wrote",),
    )


CASES: dict[str, Callable[[Path, dict], Case]] = {
    "eval labels sharing a folder": eval_labels,
    "rg: field without a value": lambda d, a: Case(
        generate_hf(d, a, "rg:basic_arithmetic?size"),
        ("rg:basic_arithmetic?size: query field 'size' has no value; write size=VALUE",),
    ),
    "rg: non-integer size": lambda d, a: Case(
        generate_hf(d, a, "rg:basic_arithmetic?size=1.5&seed=1"),
        ("size must be an integer >= 0, got 1.5",),
    ),
    "unknown device": lambda d, a: Case(
        generate_hf(d, a, a["data"], "model.device=banana"),
        ("device 'banana': not a device; use cpu, cuda, cuda:N, mps or auto",),
    ),
    "infinite epochs": lambda d, a: Case(
        ["sft", *sets(*sft_settings(d, a, a["data"], "train.max_steps=null", "train.epochs=.inf"))],
        ("train.epochs: must be a finite number, got inf",),
    ),
    "empty stop string": lambda d, a: Case(
        generate_hf(d, a, a["data"], "generation.stop=['']"),
        ("generation.stop: an empty string ends every completion at once; drop it",),
    ),
    "max_new_tokens beyond the context, with a library warning": lambda d, a: Case(
        generate_hf(d, a, a["data"], f"model.name={a['chatty']}", "generation.max_new_tokens=600"),
        (
            "generation.max_new_tokens: 600 leaves no room for a prompt in the model's context of "
            "512 tokens",
        ),
    ),  # fmt: skip
    "source_id of the wrong type": lambda d, a: Case(
        curate(d, write(d / "s.jsonl", '{"question": "q", "completion": "c", "source_id": [1]}\n')),
        ("s.jsonl:1: field 'source_id' must be a string, got list [1]",),
    ),
    "teacher.system_prompt of the wrong type": lambda d, a: Case(
        [
            "sft",
            *sets(
                *sft_settings(
                    d,
                    a,
                    write(
                        d / "s.jsonl",
                        json.dumps(
                            {"question": "q", "completion": "c", "teacher": {"system_prompt": 5}}
                        )
                        + "\n",
                    ),
                )
            ),
        ],
        ("s.jsonl:1: field 'teacher.system_prompt' must be a string or null, got int 5",),
    ),  # fmt: skip
    "manifest not a mapping": bad_manifest,
    "endpoint answers a number": endpoint_content,
    "checkpoint write on a full disk": checkpoint_disk_full,
    "truncated checkpoint": truncated_checkpoint,
}


@pytest.mark.parametrize("name", CASES)
def test_refused_in_one_line(name, workdir, assets):
    case = CASES[name](workdir, assets)
    run = workdir / "run"
    before = tree_hash(run)
    proc = run_cli_in(case)
    assert_exactly_one_error_line(proc, *case.fragments)
    if not case.started:
        assert tree_hash(run) == before
        return
    attempts = json.loads((run / "manifest.json").read_text())["attempts"]
    assert attempts[-1]["status"] == "failed"
    assert [p for p in run.rglob("*") if ".tmp" in p.name] == []  # no half-written file
    if name == "endpoint answers a number":
        assert (run / "samples" / "part-00000.jsonl").read_text() == (
            '{"id": "old", "question": "q"}\n'
        )
        assert sorted(p.name for p in (run / "samples").iterdir()) == ["part-00000.jsonl"]
