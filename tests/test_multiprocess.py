"""`potstill sft` and `potstill distill` under `accelerate launch` with two CPU processes (gloo).

One process with grad_accum=2 and two processes with grad_accum=1 take the same micro-batches
per step (a micro-batch is addressed by its global index) and normalise by the same window of
target tokens, so their per-step losses agree. They are not bit-identical: the window's gradient
is summed in another order (locally vs gloo's all-reduce) and float32 addition is not
associative; measured on these runs the losses agree to 1e-7 relative or better (sft: to the
last digit, distill online: 4e-8, grad norms 7e-8). The tolerance (rel 1e-5) leaves room for that
and nothing more: a wrong normalisation (per process, not per window) would be off by far more.

The launch is the one docs/scale_out.md shows: configs/accelerate/cpu-2proc.yaml (accelerate's own
`--cpu --num_processes 2` starts a single process without mpirun; that case is refused).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from potstill.train.loop import read_metrics

from .conftest import assert_one_line_error, run_cli, run_in_group
from .distill_helpers import config, make_teacher_dir, write_cache, write_data

ROOT = Path(__file__).resolve().parents[1]
CPU_2PROC = ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"
AGREE = {"rel": 1e-5, "abs": 1e-6}
"""1 process vs 2: float32 summation order only (see the module docstring)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], processes: int) -> subprocess.CompletedProcess:
    """`potstill ARGS` in one process, or under `accelerate launch` with two CPU processes."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env.pop("POTSTILL_DEBUG", None)
    if processes == 1:
        cmd = [sys.executable, "-m", "potstill", *args]
    else:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(CPU_2PROC),
            "--num_processes", str(processes),
            "--main_process_port", str(_free_port()),
            "-m", "potstill", *args,
        ]  # fmt: skip
    proc = run_in_group(cmd, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-3000:])
    return proc


def _common(out, accum: int, steps: int = 3) -> list[str]:
    sets = [
        "data.system_prompt=null",
        f"train.max_steps={steps}",
        "train.save_every=2",
        "train.micro_batch_size=2",
        f"train.grad_accum={accum}",
        "train.lr=0.01",
        "train.warmup_ratio=0.0",
        "run.log_with=[]",
        f"run.output_dir={out}",
    ]
    return [arg for s in sets for arg in ("--set", s)]


def _sft(model_dir, data, out, accum):
    return [
        "sft",
        "--set", f"model.name={model_dir}",
        "--set", "model.lora={r: 4, alpha: 8, dropout: 0.0}",
        "--set", f"data.source={data}",
        *_common(out, accum),
    ]  # fmt: skip


def _distill(student, teacher, data, out, accum, *extra):
    return [
        "distill",
        "--set", f"student.name={student}",
        "--set", "student.lora={r: 4, alpha: 8, dropout: 0.0}",
        "--set", f"teacher.model.name={teacher}",
        "--set", f"data.source={data}",
        *_common(out, accum),
        *[arg for s in extra for arg in ("--set", s)],
    ]  # fmt: skip


def _assert_same_losses(one: Path, two: Path, keys=("loss",)) -> None:
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in keys:
            assert b[step][key] == pytest.approx(a[step][key], **AGREE), (step, key)


def _assert_one_consistent_run(out: Path, steps: int = 3) -> None:
    """What the main process alone wrote: one attempt, one set of checkpoints, one final model,
    one log line per step; nothing half-written."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["processes"] == 2
    assert manifest["counts"]["global_batch"] == 4
    assert [a["status"] for a in manifest["attempts"]] == ["completed"] * len(manifest["attempts"])
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000002", f"step-{steps:06d}"]  # no .tmp-* leftovers
    state = json.loads((out / "checkpoints" / ckpts[-1] / "state.json").read_text())
    assert state["step"] == steps and state["micro_batches"] == 2 * steps
    assert (out / "final" / "adapter_config.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    log = (out / "logs" / "run.log").read_text()
    assert log.count("run started") == len(manifest["attempts"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines][:steps] == list(range(1, steps + 1))


def _resume_matches(args_of, out: Path) -> None:
    """Cut a finished 2-process run back to its step-2 checkpoint, resume it on 2 processes:
    step 3 repeats the uninterrupted run's (same split, so the same numbers)."""
    expected = read_metrics(out / "metrics.jsonl")
    shutil.rmtree(out / "checkpoints" / "step-000003")
    shutil.rmtree(out / "final")
    proc = _launch([*args_of(out), "--resume"], 2)
    assert proc.stderr.count("resuming from") + proc.stdout.count("resuming from") == 1
    resumed = read_metrics(out / "metrics.jsonl")
    for key in ("loss", "grad_norm"):
        assert resumed[3][key] == pytest.approx(expected[3][key], rel=1e-6)
    _assert_one_consistent_run(out)


@pytest.mark.slow
def test_sft_two_processes_equal_one_with_accumulation_and_resume(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(_sft(tiny_model_dir, data, one, accum=2), 1)
    proc = _launch(_sft(tiny_model_dir, data, two, accum=1), 2)
    assert proc.stdout.count("done 3 steps") == 1  # only the main process reports
    _assert_same_losses(one, two, keys=("loss", "ce"))
    _assert_one_consistent_run(two)
    _resume_matches(lambda out: _sft(tiny_model_dir, data, out, accum=1), two)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("mp-distill")
    return tiny_model_dir, make_teacher_dir(root / "teacher"), write_data(root / "data.jsonl"), root


@pytest.mark.slow
def test_distill_online_two_processes_equal_one_and_resume(pair, tmp_path):
    student, teacher, data, _ = pair
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(_distill(student, teacher, data, one, 2), 1)
    _launch(_distill(student, teacher, data, two, 1), 2)
    _assert_same_losses(one, two, keys=("loss", "ce", "soft"))
    _assert_one_consistent_run(two)
    _resume_matches(lambda out: _distill(student, teacher, data, out, 1), two)


@pytest.mark.slow
def test_distill_offline_cache_two_processes_equal_one(pair, tmp_path):
    student, teacher, data, root = pair
    cache = write_cache(root / "cache", teacher, config(student, teacher, data, root / "x"), k=8)
    extra = ("teacher.mode=offline", f"teacher.cache={cache}")
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(_distill(student, teacher, data, one, 2, *extra), 1)
    _launch(_distill(student, teacher, data, two, 1, *extra), 2)
    _assert_same_losses(one, two, keys=("loss", "ce", "soft"))
    _assert_one_consistent_run(two)


def _rlt_train(model_dir, data, out, accum):
    from .test_rlt_train import NO_SYSTEM, TINY_TAGS

    sets = [
        f"teacher.name={model_dir}", f"student.name={model_dir}", f"data.source={data}",
        "grpo.group_size=3", "grpo.max_new_tokens=6", "grpo.temperature=1.0",
        "train.max_steps=3", "train.save_every=2", "train.micro_batch_size=2",
        f"train.grad_accum={accum}", "train.lr=0.01", "run.log_with=[]", f"run.output_dir={out}",
    ]  # fmt: skip
    return ["rlt", "train", *[a for s in sets for a in ("--set", s)], *TINY_TAGS, *NO_SYSTEM]


@pytest.mark.slow
def test_rlt_train_two_processes_equal_one_and_resume(tiny_model_dir, tmp_path):
    """Rollout seeds follow the micro-batch's global index, so each process samples the groups
    one process would have sampled for the same micro-batches: same rewards, same loss."""
    from potstill.data import write_records

    rows = [{"id": f"q{i}", "question": f"{i} + 7?", "solution": str(i + 7)} for i in range(8)]
    data = write_records(tmp_path / "q.jsonl", rows)
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(_rlt_train(tiny_model_dir, data, one, 2), 1)
    _launch(_rlt_train(tiny_model_dir, data, two, 1), 2)
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert b[1]["loss"] == pytest.approx(a[1]["loss"], **AGREE)  # same weights, same samples
    # Later steps sample and reward with weights that differ in float32 summation order (~1e-7),
    # and (r - mean) / std magnifies that when a group's rewards lie close: 5e-4 rel. measured.
    for step in (2, 3):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-2, abs=1e-4), step
    _assert_one_consistent_run(two)
    _resume_matches(lambda out: _rlt_train(tiny_model_dir, data, out, 1), two)


def test_accelerate_cpu_flag_without_mpirun_is_refused(tiny_model_dir, tmp_path):
    # What `accelerate launch --cpu --num_processes 2` hands its one process: CPU and a
    # rendezvous address, but no rank.
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env[name] = ""
    data = write_data(tmp_path / "data.jsonl")
    proc = run_cli(*_sft(tiny_model_dir, data, tmp_path / "run", 1), env=env)
    assert_one_line_error(proc, "starts a single process", "cpu-2proc.yaml")
    assert not (tmp_path / "run").exists()
