"""`engine: ray` on a real local Ray cluster (2 CPU workers, the tiny models of conftest): the same
files as the local engine byte for byte, a killed actor's batch retried, batches that fail every
retry listed in failed.jsonl, a killed driver resumed, and Ray missing or misconfigured as one
line (joining a running cluster: test_ray_cluster.py). Every test leaves no Ray process behind
(`no_ray_left`)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from potstill.config import from_dict
from potstill.data import read_shards, write_records
from potstill.errors import ConfigError
from potstill.stages.generate import GenerateConfig, run_generate
from potstill.stages.teacher_cache import TeacherCacheConfig, run_teacher_cache

from .conftest import assert_one_line_error, kill_group, run_cli

SOURCE = "rg:basic_arithmetic?size=24&seed=3"
LONG_SOURCE = "rg:basic_arithmetic?size=60&seed=4"
RAY = {"num_workers": 2, "num_cpus_per_worker": 1}


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


TAG = "POTSTILL_RAY_TEST"
"""Set to a fresh value per test: every process the test starts (its Ray cluster's GCS, raylet
and workers, a CLI driver's too) inherits it, so a leftover is found by it, whatever other Ray
clusters (a parallel test worker's) run on the machine."""


def ray_processes() -> list[str]:
    """The processes, other than this one, that carry this test's tag: what would outlive it."""
    tag = f"{TAG}={os.environ[TAG]}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if tag in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.fixture
def no_ray_left(monkeypatch):
    """Fails the test if a process it started (a raylet, the GCS, a worker) outlives it."""
    pytest.importorskip("ray")
    monkeypatch.setenv(TAG, uuid.uuid4().hex)
    yield
    import ray

    ray.shutdown()
    deadline = time.monotonic() + 30
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_processes() == []


def gen_config(model_dir, out, engine, source=SOURCE, ray=RAY, **generation) -> GenerateConfig:
    return from_dict(
        GenerateConfig,
        {
            "model": {"name": str(model_dir), "device": "cpu"},
            "data": {"source": source},
            "generation": {
                "max_new_tokens": 12,
                "system_prompt": None,
                "num_samples": 2,
                "temperature": 1.0,
                "batch_size": 4,
                **generation,
            },  # fmt: skip
            "run": {"output_dir": str(out)},
            "engine": engine,
            "ray": ray,
        },
    )


def files(directory: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob(pattern))}


def lines(directory: Path, pattern: str) -> list[bytes]:
    return sorted(line for p in directory.glob(pattern) for line in p.read_bytes().splitlines())


def kill_when_written(directory: Path, pattern: str, index: int, seen: dict) -> threading.Thread:
    """SIGKILL actor `index`'s process once the first shard is on disk (in a thread of this
    driver: it finds the actor by name); `seen` gets the pid and the shards on disk then."""
    from potstill.teacher.ray_pool import worker_pid

    def kill() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if shards := list(directory.glob(pattern)):
                seen["pid"] = pid = worker_pid(index)
                seen["shards"] = len(shards)
                seen["tagged"] = len(ray_processes())  # the cluster, as no_ray_left sees it
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_generate_on_ray_writes_the_local_files_byte_for_byte(
    tiny_model_dir, tmp_path, no_ray_left
):
    local = run_generate(gen_config(tiny_model_dir, tmp_path / "local", "local"), quiet())
    on_ray = run_generate(gen_config(tiny_model_dir, tmp_path / "ray", "ray"), quiet())
    expected = files(tmp_path / "local" / "samples", "part-*.jsonl")
    assert len(expected) == 12  # 48 samples, one shard per batch of 4
    assert files(tmp_path / "ray" / "samples", "part-*.jsonl") == expected
    assert local["samples"] == on_ray["samples"] == 48
    assert "failed" not in on_ray and not (tmp_path / "ray" / "failed.jsonl").exists()


def cache_records(path: Path) -> Path:
    records = [
        {"id": f"q{i}", "question": f"What is {i} + {i}?",
         "solution": "Let's think step by step. " * (1 + i % 3) + f"{i} + {i} = {2 * i}"}
        for i in range(20)
    ]  # fmt: skip
    write_records(path, records)
    return path


def cache_config(model_dir, records, out, engine) -> TeacherCacheConfig:
    return from_dict(
        TeacherCacheConfig,
        {
            "teacher": {"name": str(model_dir), "device": "cpu"},
            "data": {"source": str(records), "target_field": "solution", "system_prompt": None},
            "k": 8, "max_seq_len": 64, "batch_size": 3, "shard_size": 4,
            "temperature": 1.0, "tail_temperatures": [2.0],
            "run": {"output_dir": str(out)}, "engine": engine, "ray": RAY,
        },
    )  # fmt: skip


@pytest.mark.slow
def test_teacher_cache_on_ray_writes_the_local_cache_byte_for_byte(
    tiny_model_dir, tmp_path, no_ray_left
):
    records = cache_records(tmp_path / "records.jsonl")
    local = run_teacher_cache(
        cache_config(tiny_model_dir, records, tmp_path / "l", "local"), quiet()
    )
    on_ray = run_teacher_cache(
        cache_config(tiny_model_dir, records, tmp_path / "r", "ray"), quiet()
    )
    expected = files(tmp_path / "l", "shard-*.safetensors")
    assert len(expected) == 5  # 20 records, 4 a shard
    assert files(tmp_path / "r", "shard-*.safetensors") == expected
    meta = [json.loads((tmp_path / d / "meta.json").read_text()) for d in ("l", "r")]
    assert [{k: v for k, v in m.items() if k != "created"} for m in meta] == [
        {k: v for k, v in meta[0].items() if k != "created"}
    ] * 2
    assert local["records"] == on_ray["records"] == 20 and local["tokens"] == on_ray["tokens"]


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_its_batch_retried(tiny_model_dir, tmp_path, no_ray_left):
    over = {"max_new_tokens": 24}
    run_generate(
        gen_config(tiny_model_dir, tmp_path / "local", "local", LONG_SOURCE, **over), quiet()
    )
    out = tmp_path / "ray"
    seen: dict = {}
    killer = kill_when_written(out / "samples", "part-*.jsonl", 0, seen)
    counts = run_generate(gen_config(tiny_model_dir, out, "ray", LONG_SOURCE, **over), quiet())
    killer.join(timeout=60)
    assert seen["shards"] < 30, "the kill landed after the job"  # 120 samples, 30 batches
    assert seen["tagged"] >= 4  # GCS, raylet, 2 actors at least: no_ray_left sees them
    ids = [r["id"] for r in read_shards(out / "samples")]
    assert len(ids) == len(set(ids)) == 120 and counts["samples"] == 120
    # the retried batch is the same batch, so every record is the local engine's byte for byte
    # (the local engine batches continuously, so with uneven lengths its shards group them
    # differently from the actors' batches)
    expected = lines(tmp_path / "local" / "samples", "part-*.jsonl")
    assert lines(out / "samples", "part-*.jsonl") == expected and len(expected) == 120
    assert "failed" not in counts


@pytest.mark.slow
def test_batches_failing_every_retry_land_in_failed_jsonl_and_a_rerun_finishes(
    tiny_model_dir, tmp_path, no_ray_left
):
    out = tmp_path / "ray"
    fragile = {"num_workers": 1, "max_restarts": 0, "max_task_retries": 0}
    cfg = gen_config(tiny_model_dir, out, "ray", LONG_SOURCE, ray=fragile, max_new_tokens=24)
    seen: dict = {}
    killer = kill_when_written(out / "samples", "part-*.jsonl", 0, seen)
    counts = run_generate(cfg, quiet())
    killer.join(timeout=60)
    written = [r["id"] for r in read_shards(out / "samples")]
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    failed_ids = [f["id"] for f in failed]
    every = {f"rg-basic_arithmetic-s4-{i}#{k}" for i in range(60) for k in range(2)}
    assert len(written) + len(failed_ids) == 120
    assert set(written) | set(failed_ids) == every and not set(written) & set(failed_ids)
    assert counts["failed"] == len(failed_ids) > 0 and counts["samples"] == len(written)
    assert all(f["error"] for f in failed)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["failed"] == len(failed_ids)
    again = run_generate(cfg, quiet())  # the same config: a run dir refuses another one
    ids = [r["id"] for r in read_shards(out / "samples")]
    assert sorted(ids) == sorted(every) and again["samples"] == 120
    assert "failed" not in again and not (out / "failed.jsonl").exists()


def cli_args(model_dir, out, source=LONG_SOURCE) -> list[str]:
    return [
        "generate",
        "--set", f"model.name={model_dir}", "--set", f"data.source={source}",
        "--set", "generation.max_new_tokens=24", "--set", "generation.system_prompt=null",
        "--set", "generation.num_samples=2", "--set", "generation.temperature=1.0",
        "--set", "generation.batch_size=4", "--set", f"run.output_dir={out}",
        "--set", "engine=ray", "--set", "ray.num_workers=2",
    ]  # fmt: skip


def stop_driver_after_shards(args: list[str], samples: Path, shards: int, sig) -> tuple[int, str]:
    """Run the CLI in its own process group; once `samples` holds more than `shards` shards,
    send `sig` (SIGTERM to the driver, SIGKILL to the whole group); (exit code, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "potstill", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(list(samples.glob("part-*.jsonl"))) <= shards and time.monotonic() < deadline:
            assert proc.poll() is None, "the driver ended before the stop"
            time.sleep(0.005)
        if sig == signal.SIGKILL:
            kill_group(proc)  # the driver, its local cluster and its actors
        else:
            os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        kill_group(proc)
    deadline = time.monotonic() + 30
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_processes() == [], "the stopped driver's cluster outlived it"
    return proc.returncode, stderr


@pytest.mark.slow
def test_a_stopped_or_killed_driver_resumes_with_nothing_lost_or_twice(
    tiny_model_dir, tmp_path, no_ray_left
):
    reference = tmp_path / "reference"
    run_generate(gen_config(tiny_model_dir, reference, "local", LONG_SOURCE, max_new_tokens=24))
    out = tmp_path / "cut"
    args = cli_args(tiny_model_dir, out)
    code, stderr = stop_driver_after_shards(args, out / "samples", 0, signal.SIGTERM)
    assert code == 130 and "interrupted: finished work is saved" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr  # not Ray's handler
    first = {r["id"]: r for r in read_shards(out / "samples")}
    code, _ = stop_driver_after_shards(args, out / "samples", len(first) // 4, signal.SIGKILL)
    assert code == -signal.SIGKILL
    before = {r["id"]: r for r in read_shards(out / "samples")}
    assert 0 < len(first) < len(before) < 120
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = list(read_shards(out / "samples"))
    assert len(after) == len({r["id"] for r in after}) == 120
    assert all(before[r["id"]] == r for r in after if r["id"] in before)  # kept as written
    expected = {r["id"]: r for r in read_shards(reference / "samples")}
    assert {r["id"]: r for r in after} == expected  # a sample depends on its seed alone


def without_ray_env(tmp_path: Path) -> dict:
    """The environment of a CLI run in which `import ray` fails as if Ray were not installed."""
    blocker = tmp_path / "block"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(blocker), *sys.path])}


def test_engine_ray_without_ray_is_one_line(tiny_model_dir, tmp_path):
    env = without_ray_env(tmp_path)
    proc = run_cli(*cli_args(tiny_model_dir, tmp_path / "out", SOURCE), env=env)
    assert_one_line_error(proc, "engine: ray needs Ray", "pip install 'potstill[ray]'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"engine": "spark"}, "engine: 'spark' is not one of 'local', 'ray'"),
        ({"ray": {"num_workers": 0}}, "ray.num_workers: must be a positive integer, got 0"),
        (
            {"ray": {"num_cpus_per_worker": 0}},
            "ray.num_cpus_per_worker: must be a finite number > 0",
        ),
        (
            {"ray": {"num_gpus_per_worker": float("inf")}},
            "ray.num_gpus_per_worker: must be a finite",
        ),
        ({"ray": {"max_restarts": -1}}, "ray.max_restarts: must be >= 0, got -1"),
        ({"ray": {"address": " "}}, "ray.address: empty"),
    ],
)
def test_bad_engine_settings_are_refused_in_one_line(override, fragment):
    for config in (GenerateConfig, TeacherCacheConfig):
        with pytest.raises(ConfigError) as info:
            from_dict(config, override)
        assert fragment in str(info.value) and "\n" not in str(info.value)


def test_failed_jsonl_keeps_each_id_with_its_error_redacted_and_goes_once_none_fails(tmp_path):
    from potstill.teacher.ray_pool import Failed, one_line, write_failed

    remote = RuntimeError(
        "Traceback (most recent call last):\n  File 'x.py', line 1\n"
        "ConnectionError: http://user:sk-abcdefghijklmnopqrstuvwx@host/v1 refused"
    )
    error = one_line(remote)
    assert error == "RuntimeError: ConnectionError: http://***@host/v1 refused"
    assert write_failed(tmp_path, [Failed(["a#0", "a#1"], error), Failed(["b#0"], "E: x")]) == 3
    rows = [json.loads(line) for line in (tmp_path / "failed.jsonl").read_text().splitlines()]
    assert rows == [
        {"id": "a#0", "error": error}, {"id": "a#1", "error": error}, {"id": "b#0", "error": "E: x"}
    ]  # fmt: skip
    assert write_failed(tmp_path, []) == 0 and not (tmp_path / "failed.jsonl").exists()
