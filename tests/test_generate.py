"""`potstill generate`: samples with provenance, resumable after SIGKILL with the very same samples,
prompts over the limit skipped and recorded, and the openai backend through the same stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from potstill.config import load_config
from potstill.data import read_shards, write_records
from potstill.data.seeds import sample_seed
from potstill.stages.generate import GenerateConfig, run_generate
from potstill.teacher.hf_backend import HFBackend
from potstill.teacher.serve import start_server

from .conftest import assert_one_line_error, build_model, build_tokenizer, run_cli

QUIET = None


def _args(model_dir, source, out, *extra):
    return [
        "generate",
        "--set", f"model.name={model_dir}",
        "--set", f"data.source={source}",
        "--set", "generation.max_new_tokens=6",
        "--set", "generation.system_prompt=null",
        "--set", f"run.output_dir={out}",
        *extra,
    ]  # fmt: skip


def test_samples_carry_ids_seeds_and_provenance(tiny_model_dir, tmp_path):
    out = tmp_path / "gen"
    proc = run_cli(
        *_args(
            tiny_model_dir, "rg:basic_arithmetic?size=3&seed=1", out,
            "--set", "generation.num_samples=2", "--set", "generation.temperature=1.0",
        )
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    samples = sorted(read_shards(out / "samples"), key=lambda r: r["id"])
    assert [s["id"] for s in samples] == [
        f"rg-basic_arithmetic-s1-{i}#{k}" for i in range(3) for k in range(2)
    ]
    first = samples[0]
    assert first["source_id"] == "rg-basic_arithmetic-s1-0"
    assert first["teacher"]["seed"] == sample_seed(0, "rg-basic_arithmetic-s1-0", 0)
    assert first["teacher"]["backend"] == "hf" and first["teacher"]["temperature"] == 1.0
    assert first["finish_reason"] in {"stop", "length"} and first["completion_tokens"] <= 6
    assert first["answer"] and first["task"] == "rg:basic_arithmetic"  # input fields kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == 6 and manifest["counts"]["records"] == 3


@pytest.mark.slow
def test_killed_run_resumes_with_exactly_the_missing_samples(tiny_model_dir, tmp_path):
    source = "rg:basic_arithmetic?size=50&seed=2"
    extra = (
        "--set", "generation.num_samples=2", "--set", "generation.temperature=1.0",
        "--set", "generation.batch_size=4", "--set", "generation.max_new_tokens=24",
    )  # fmt: skip
    full = tmp_path / "full"
    assert run_cli(*_args(tiny_model_dir, source, full, *extra)).returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "potstill", *_args(tiny_model_dir, source, cut, *extra)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list((cut / "samples").glob("part-*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list(read_shards(cut / "samples")))
    assert 0 < partial < 100  # killed part-way
    assert run_cli(*_args(tiny_model_dir, source, cut, *extra)).returncode == 0
    resumed = list(read_shards(cut / "samples"))
    assert len(resumed) == len({r["id"] for r in resumed}) == 100
    expected = {r["id"]: r["completion"] for r in read_shards(full / "samples")}
    assert {r["id"]: r["completion"] for r in resumed} == expected


def test_prompts_over_the_limit_are_skipped_and_recorded(tiny_model_dir, tmp_path):
    data = write_records(
        tmp_path / "q.jsonl",
        [
            {"id": "short", "question": "What is 2?"},
            {"id": "long", "question": "Calculate 5 - 3 - 6. " * 20},
        ],
    )
    out = tmp_path / "gen"
    proc = run_cli(*_args(tiny_model_dir, data, out, "--set", "generation.max_prompt_tokens=40"))
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in read_shards(out / "samples")] == ["short#0"]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [r["id"] for r in skipped] == ["long"]
    assert skipped[0]["drop_reason"].startswith("prompt_too_long: ")
    assert json.loads((out / "manifest.json").read_text())["counts"]["skipped_prompt_too_long"] == 1


def test_greedy_with_many_samples_warns(tiny_model_dir, tmp_path):
    proc = run_cli(
        *_args(tiny_model_dir, "rg:basic_arithmetic?size=1&seed=1", tmp_path / "g",
               "--set", "generation.num_samples=2")
    )  # fmt: skip
    assert proc.returncode == 0
    assert "warning: temperature 0 with num_samples=2" in " ".join(proc.stdout.split())


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--set", "generation.num_samples=0"), "num_samples: must be > 0, got 0"),
        (("--set", "backend.kind=openai", "--set", "backend.openai.api_key_env=POTSTILL_NO_KEY"),
         "POTSTILL_NO_KEY"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(tiny_model_dir, tmp_path, extra, fragment):
    out = tmp_path / "g"
    proc = run_cli(*_args(tiny_model_dir, "rg:basic_arithmetic?size=1&seed=1", out, *extra))
    assert_one_line_error(proc, fragment)
    assert not out.exists()


def test_record_without_question_is_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "a", "question": "What is 2?"}\n{"id": "b", "answer": "3"}\n')
    proc = run_cli(*_args(tiny_model_dir, data, tmp_path / "g"))
    assert_one_line_error(proc, f"{data}:2: missing required field 'question'")


def test_unreachable_endpoint_exits_2_naming_the_url(tiny_model_dir, tmp_path):
    url = "http://127.0.0.1:9/v1"  # the discard port: nothing listens
    proc = run_cli(
        *_args(tiny_model_dir, "rg:basic_arithmetic?size=2&seed=1", tmp_path / "g",
               "--set", "backend.kind=openai", "--set", f"backend.openai.base_url={url}",
               "--set", "backend.openai.api_key_env=null", "--set", "backend.openai.max_retries=1",
               "--set", "backend.openai.backoff=0.01")
    )  # fmt: skip
    assert_one_line_error(proc, url)


def test_openai_backend_through_the_stage_equals_hf(tmp_path):
    tokenizer = build_tokenizer()
    backend = HFBackend(build_model(tokenizer), tokenizer, batch_size=4, model_id="tiny")
    server, url = start_server(backend, model_name="tiny")
    try:
        common = [
            "data.source=rg:basic_arithmetic?size=4&seed=3",
            "generation.max_new_tokens=6",
            "generation.system_prompt=step_by_step",
            "model.name=tiny",
        ]
        hf_cfg = load_config(GenerateConfig, overrides=[*common, f"run.output_dir={tmp_path}/a"])
        run_generate(hf_cfg, QUIET, backend=backend)
        http_cfg = load_config(
            GenerateConfig,
            overrides=[
                *common,
                f"run.output_dir={tmp_path}/b",
                "backend.kind=openai",
                f"backend.openai.base_url={url}",
                "backend.openai.api_key_env=null",
            ],
        )
        run_generate(http_cfg, QUIET)
    finally:
        server.close()
    a = {r["id"]: r["completion"] for r in read_shards(tmp_path / "a" / "samples")}
    b = {r["id"]: r["completion"] for r in read_shards(tmp_path / "b" / "samples")}
    assert a == b and len(a) == 4
