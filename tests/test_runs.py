"""Run directories: one writer at a time, a changed input noticed before any resume, and an
output_dir that cannot be a run directory refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from potstill.errors import ConfigError
from potstill.fsutil import LockHeld, try_lock, unlock
from potstill.runs import LOCK, RunDir
from potstill.stages.generate import GenerateConfig
from potstill.stages.sft import SFTConfig
from potstill.teacher.cache_writer import CacheWriter

from .conftest import assert_one_line_error, kill_group, run_cli
from .fake_openai import fake_openai


def _generate_cfg(source, out) -> GenerateConfig:
    cfg = GenerateConfig()
    cfg.data.source, cfg.run.output_dir = str(source), str(out)
    return cfg


def _questions(path: Path, questions: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in enumerate(questions)]
    path.write_text("".join(rows))
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _cli_args(server_url: str, source: Path, out: Path) -> list[str]:
    return [
        "generate",
        *("--set", "model.name=fake", "--set", f"data.source={source}"),
        *("--set", "backend.kind=openai", "--set", f"backend.openai.base_url={server_url}"),
        *("--set", "backend.openai.api_key_env=null", "--set", "generation.system_prompt=null"),
        *("--set", f"run.output_dir={out}"),
    ]  # fmt: skip


# One writer per run directory.


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, monkeypatch):
    source = _questions(tmp_path / "q.jsonl", ["1 + 1?"])
    out = tmp_path / "run"
    cfg = _generate_cfg(source, out)
    with RunDir(out, command="generate", config=cfg, inputs=[str(source)]) as run:
        before = _snapshot(out)
        assert (out / LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(ConfigError) as refused:
            RunDir(out, command="generate", config=cfg, inputs=[str(source)])
        assert str(refused.value) == (
            f"{out} is in use by another potstill process (pid {os.getpid()}); wait for it or "
            "use another run.output_dir"
        )
        assert _snapshot(out) == before
        # The stage's own writers in the same directory (a teacher cache) take their own lock.
        meta = {"vocab_size": 8, "k": 2, "encoding": "packed-f32"}
        with CacheWriter(run.path, meta):
            pass
        # Another rank of a multi-process launch neither takes the lock nor is refused.
        monkeypatch.setenv("RANK", "1")
        follower = RunDir(out, command="generate", config=cfg, inputs=[str(source)])
        assert not follower.writer
        monkeypatch.delenv("RANK")
    assert not (out / LOCK).exists()  # released and removed on exit
    with RunDir(out, command="generate", config=cfg, inputs=[str(source)]):
        pass
    assert [a["status"] for a in json.loads((out / "manifest.json").read_text())["attempts"]] == [
        "completed",
        "completed",
    ]


def test_two_generate_processes_on_one_run_dir(tmp_path):
    """The first holds the directory (its request held by the server); the second is refused
    in one line naming the first's pid and touches nothing; the first then finishes normally."""
    source = _questions(tmp_path / "q.jsonl", ["1 + 1?", "2 + 2?"])
    out = tmp_path / "run"
    with fake_openai() as server:
        server.mode = "hold"
        args = _cli_args(server.url, source, out)
        first = subprocess.Popen(
            [sys.executable, "-m", "potstill", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not (server.requests and (out / LOCK).is_file()):
                assert first.poll() is None and time.monotonic() < deadline, first.stderr
                time.sleep(0.2)
            assert (out / LOCK).read_text().strip() == str(first.pid)
            before = _snapshot(out)
            second = run_cli(*args)
            assert_one_line_error(
                second,
                f"{out} is in use by another potstill process (pid {first.pid}); wait for it "
                "or use another run.output_dir",
            )
            assert _snapshot(out) == before
            server.release.set()
            _, stderr = first.communicate(timeout=120)
        finally:
            kill_group(first)
    assert first.returncode == 0, stderr
    assert not (out / LOCK).exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["status"] for a in manifest["attempts"]] == ["completed"]
    assert manifest["counts"]["samples"] == 2


def test_a_killed_holder_leaves_its_lock_free(tmp_path):
    """SIGKILL runs no cleanup: the lock file stays, with the dead pid, and the OS has dropped
    the lock, so the next run takes it (and removes the file when done)."""
    lock = tmp_path / LOCK
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from potstill.fsutil import try_lock; "
         f"held = try_lock({str(lock)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LockHeld) as held:
            try_lock(lock)
        assert held.value.pid == holder.pid
    finally:
        kill_group(holder)
        holder.wait()
    assert lock.read_text() == f"{holder.pid}\n"
    taken = try_lock(lock)
    assert lock.read_text() == f"{os.getpid()}\n"
    unlock(taken, remove=True)
    assert not lock.exists()


# A changed input is noticed.


def test_changed_input_refuses_to_resume_finished_work(tmp_path):
    source = _questions(tmp_path / "q.jsonl", ["1 + 1?", "2 + 2?"])
    out = tmp_path / "run"
    cfg = _generate_cfg(source, out)
    with RunDir(out, command="generate", config=cfg, inputs=[str(source)]) as run:
        old = run.manifest["inputs"][0]["sha256"]
        (run.path / "samples").mkdir()
        (run.path / "samples" / "part-00000.jsonl").write_text("{}\n")
    _questions(source, ["1 + 1?", "3 + 3?"])
    before = _snapshot(out)
    with pytest.raises(ConfigError) as refused:
        RunDir(out, command="generate", config=cfg, inputs=[str(source)])
    message = str(refused.value)
    assert message.startswith(f"data.source {source} changed since this run started (sha256 ")
    assert f"{old[:12]}… then" in message
    assert message.endswith("rerun with a new run.output_dir, or restore the file")
    assert _snapshot(out) == before
    _questions(source, ["1 + 1?", "2 + 2?"])  # restored: the run resumes
    with RunDir(out, command="generate", config=cfg, inputs=[str(source)]) as run:
        assert run.manifest["inputs"][0]["sha256"] == old


def test_an_sft_with_checkpoints_names_its_data_file_and_one_without_work_takes_the_new_one(
    tmp_path,
):
    data = _questions(tmp_path / "kept.jsonl", ["a"])
    cfg = SFTConfig()
    cfg.data.source, cfg.run.output_dir = str(data), str(tmp_path / "sft")
    with RunDir(tmp_path / "sft", command="sft", config=cfg, inputs=[str(data)]) as run:
        (run.path / "checkpoints" / "step-4").mkdir(parents=True)
        (run.path / "checkpoints" / "step-4" / "state.json").write_text("{}")
    with RunDir(tmp_path / "empty", command="sft", config=cfg, inputs=[str(data)]):
        pass  # failed before any work: only config, manifest and logs
    _questions(data, ["b"])
    with pytest.raises(ConfigError, match=rf"^data.source {data} changed since this run"):
        RunDir(tmp_path / "sft", command="sft", config=cfg, inputs=[str(data)])
    with RunDir(tmp_path / "empty", command="sft", config=cfg, inputs=[str(data)]) as run:
        assert (
            run.manifest["inputs"][0]["sha256"]
            != json.loads((tmp_path / "sft" / "manifest.json").read_text())["inputs"][0]["sha256"]
        )


def test_generate_rerun_after_an_edited_question_is_refused(tmp_path):
    source = _questions(tmp_path / "q.jsonl", ["1 + 1?", "2 + 2?"])
    out = tmp_path / "run"
    with fake_openai() as server:
        args = _cli_args(server.url, source, out)
        first = run_cli(*args)
        assert first.returncode == 0, first.stderr
        _questions(source, ["1 + 1?", "2 + 5?"])
        before = _snapshot(out)
        rerun = run_cli(*args)
    assert_one_line_error(
        rerun,
        f"error: data.source {source} changed since this run started (sha256 ",
        "rerun with a new run.output_dir, or restore the file",
    )
    assert _snapshot(out) == before
    assert server.requests == 2  # the rerun asked for nothing


# output_dir sanity.


def _refused(out, source: Path) -> str:
    with pytest.raises(ConfigError) as refused:
        RunDir(out, command="generate", config=_generate_cfg(source, out), inputs=[str(source)])
    return str(refused.value)


def test_output_dir_mixed_with_the_input_is_refused(tmp_path):
    source = _questions(tmp_path / "data" / "q.jsonl", ["1 + 1?"])
    folder = source.parent
    cases = [  # (output_dir, the input, the message)
        (folder, folder, f"run.output_dir {folder} is the input data.source {folder}"),
        (folder / "o", folder, f"run.output_dir {folder / 'o'} is inside the input data.source"),
        (tmp_path, source, f"run.output_dir {tmp_path} holds the input data.source {source}"),
    ]
    for out, spec, message in cases:
        with pytest.raises(ConfigError) as refused:
            RunDir(out, command="generate", config=_generate_cfg(spec, out), inputs=[str(spec)])
        assert str(refused.value).startswith(message), refused.value
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "q.jsonl"]


def test_output_dir_empty_a_file_or_unwritable_is_refused(tmp_path, monkeypatch):
    source = _questions(tmp_path / "q.jsonl", ["1 + 1?"])
    monkeypatch.chdir(tmp_path)
    assert _refused("", source).startswith("run.output_dir is empty, which would write into")
    assert _refused(source, source) == (
        f"run.output_dir {source} is a file, not a directory; name a directory"
    )
    if Path("/sys").is_dir():  # sysfs: no one may create a directory there, root included
        assert _refused("/sys/potstill-run", source) == (
            "run.output_dir /sys/potstill-run: cannot write there (Operation not permitted); use "
            "a writable directory"
        )
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if not os.access(locked, os.W_OK):  # root writes anyway: nothing to refuse then
            assert _refused(locked, source) == (
                f"run.output_dir {locked}: cannot write there (Permission denied); use a "
                "writable directory"
            )
            assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl", "read-only"]


@pytest.mark.parametrize("case", ["input folder", "empty", "a file"])
def test_cli_refuses_a_bad_output_dir_in_one_line(tmp_path, case):
    source = _questions(tmp_path / "data" / "q.jsonl", ["1 + 1?"])
    out, expected = {
        "input folder": (source.parent, f"run.output_dir {source.parent} holds the input"),
        "empty": ("", "run.output_dir: empty, which would write into the current directory"),
        "a file": (source, f"run.output_dir {source} is a file, not a directory"),
    }[case]
    before = _snapshot(tmp_path)
    proc = run_cli(*_cli_args("http://127.0.0.1:9/v1", source, out), cwd=tmp_path)
    assert_one_line_error(proc, expected)
    assert _snapshot(tmp_path) == before


# Growable lists: an eval's models and tasks, a compare's methods, may be added on a rerun.


def _eval_cfg(out, models: list[tuple[str, str]]):
    from potstill.eval.config import EvalModel, EvalTask
    from potstill.stages.eval import EvalConfig

    cfg = EvalConfig(models=[EvalModel(name=n, label=label) for label, n in models])
    cfg.tasks = [EvalTask(source="rg:chain_sum?size=2&seed=1", name="chain")]
    cfg.run.output_dir = str(out)
    return cfg


def test_a_rerun_may_add_items_to_a_growable_list_but_not_change_one_it_kept(tmp_path):
    out = tmp_path / "run"
    grows = ("models", "tasks")
    first = _eval_cfg(out, [("a", "model-a")])
    with RunDir(out, command="eval", config=first, growable=grows):
        pass
    more = _eval_cfg(out, [("a", "model-a"), ("b", "model-b")])
    with RunDir(out, command="eval", config=more, growable=grows):
        pass
    # The stored config is the one the run now holds: b's answers belong to it.
    stored = (out / "config.yaml").read_text()
    assert "label: b" in stored and "name: model-b" in stored
    changed = _eval_cfg(out, [("a", "model-c"), ("b", "model-b")])
    before = _snapshot(out)
    with pytest.raises(ConfigError) as refused:
        RunDir(out, command="eval", config=changed, growable=grows)
    assert str(refused.value) == (
        f"{out} holds a run with another config: models[a].name ('model-a' before, 'model-c' "
        "now); use a new output_dir, or delete the old run to start over"
    )
    assert _snapshot(out) == before
    # A list that may not grow is still checked whole.
    with pytest.raises(ConfigError, match=r"another config: models \("):
        RunDir(out, command="eval", config=_eval_cfg(out, [("a", "model-a")]))


def test_a_run_made_before_a_field_existed_resumes_while_the_field_is_at_its_default(tmp_path):
    """A config.yaml written by an older potstill lacks the fields added since (here `engine`,
    `ray` and a nested `generation.batch_size`); at their defaults the run resumes, a field
    set to anything else is a change like any other."""
    import yaml

    out = tmp_path / "run"
    source = _questions(tmp_path / "q.jsonl", ["1 + 1?"])
    cfg = GenerateConfig()
    cfg.data.source, cfg.run.output_dir = str(source), str(out)
    with RunDir(out, command="generate", config=cfg, inputs=[str(source)]):
        pass
    old = yaml.safe_load((out / "config.yaml").read_text())
    del old["engine"], old["ray"], old["generation"]["batch_size"]
    (out / "config.yaml").write_text(yaml.safe_dump(old))
    with RunDir(out, command="generate", config=cfg, inputs=[str(source)]):
        pass
    (out / "config.yaml").write_text(yaml.safe_dump(old))
    cfg.engine, cfg.generation.batch_size = "ray", 3
    with pytest.raises(ConfigError) as refused:
        RunDir(out, command="generate", config=cfg, inputs=[str(source)])
    assert str(refused.value) == (
        f"{out} holds a run with another config: engine (None before, 'ray' now); "
        "generation.batch_size (None before, 3 now); use a new output_dir, or delete the old "
        "run to start over"
    )
