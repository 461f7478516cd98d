"""The kill/resume harness: start a long `potstill` command as a subprocess, stop it at seeded
moments inside its real work (SIGKILL, or a clean SIGINT/SIGTERM), rerun it, and compare what the
interrupted runs end with to an uninterrupted run of the same config.

A stop waits until the command has made durable progress (`Case.units`: shards or checkpoint steps
on disk) past a seeded target, then waits a seeded fraction of one unit's time (measured on the
uninterrupted reference run) and sends the signal, so it lands between two units of real work, not
in the imports. The commands the suite drives are `Case`s in test_kill_resume.py's CASES.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from potstill.train.loop import read_metrics

CLEAN = (signal.SIGINT, signal.SIGTERM)
"""Signals a command must stop on cleanly: exit 130, no traceback, work so far kept."""
POLL_SECONDS = 0.005
TIMEOUT = 900.0
"""Seconds a run may take: a 2-step tiny run takes ~20 s idle; an rlt train rerun took over
300 s on a machine loaded to 7."""


@dataclass
class Case:
    """One long command as the kill/resume suite drives it. Adding a command is one more Case."""

    name: str
    verb: tuple[str, ...]
    """The CLI words before the overrides, e.g. ("teacher", "cache")."""
    setup: Callable[[Path, Path], list[str]]
    """(tiny model dir, scratch dir) -> the `key=value` overrides (without run.output_dir); writes
    whatever data the command needs under the scratch dir."""
    reference: Callable[[list[str]], object]
    """Runs the same command in this process, uninterrupted, from the overrides."""
    kind: Literal["records", "training"]
    """records: the output is a set of records by id; training: metrics, checkpoints, weights."""
    units: Callable[[Path], int]
    """Durable progress in an output dir: shards written, or the last checkpoint's step."""
    stops: tuple[signal.Signals, ...] = (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)
    """The signals of the stops, in order; each stop is followed by a rerun."""
    partial: Callable[[Path], list[dict]] | None = None
    """records: what an interrupted run has durably written (each must equal the reference's)."""
    final: Callable[[Path], object] | None = None
    """records: the finished output, compared whole with the reference's."""
    progress: str | None = None
    """records: the progress bar's label; after a clean stop its M/N must all be on disk."""
    seed: int = 0


@dataclass
class Stopped:
    """One interrupted attempt."""

    signal: signal.Signals
    target: int
    delay: float
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def cli(case: Case, overrides: list[str], out: Path) -> list[str]:
    sets = [x for o in [*overrides, f"run.output_dir={out}"] for x in ("--set", o)]
    return [sys.executable, "-m", "potstill", *case.verb, *sets]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("POTSTILL_DEBUG", None)  # a clean stop must not print a traceback
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_to_end(case: Case, overrides: list[str], out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cli(case, overrides, out), capture_output=True, text=True, env=_env(), timeout=TIMEOUT
    )
    assert proc.returncode == 0, f"{case.name}: the rerun failed\n{proc.stdout}\n{proc.stderr}"
    return proc


def stop_at(
    case: Case, overrides: list[str], out: Path, *, sig: signal.Signals, target: int, delay: float
) -> Stopped:
    """Start the command; once `case.units(out) >= target`, wait `delay` seconds (or until the
    next unit, if sooner) and send `sig`. Fails if the command ends before the signal: the stop
    would have proved nothing."""
    logs = out.parent / f"{out.name}-logs"
    logs.mkdir(exist_ok=True)
    stdout_path, stderr_path = logs / "stdout.txt", logs / "stderr.txt"
    start = time.monotonic()
    # Files, not pipes: a pipe nobody reads while we poll could fill and stall the command.
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            cli(case, overrides, out),
            stdout=stdout,
            stderr=stderr,
            env=_env(),
            text=True,
            # As a shell starts a foreground job: a pytest run in the background (SIGINT ignored)
            # would hand the ignore down, and SIGINT would not stop the command.
            preexec_fn=_default_sigint,
        )
        try:
            while proc.poll() is None and _units(case, out) < target:
                if time.monotonic() - start > TIMEOUT:
                    raise AssertionError(f"{case.name}: no unit {target} in {TIMEOUT} s")
                time.sleep(POLL_SECONDS)
            # The delay is a guess from the reference's pace; the machine's load can change it.
            # The next unit appearing ends it early, so the stop still lands before the end.
            deadline = time.monotonic() + delay
            while (
                proc.poll() is None and time.monotonic() < deadline and _units(case, out) <= target
            ):
                time.sleep(POLL_SECONDS)
            alive = proc.poll() is None
            if alive:
                proc.send_signal(sig)
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out_text, err_text = stdout_path.read_text(), stderr_path.read_text()
    assert alive, (
        f"{case.name}: the command ended (exit {proc.returncode}) before {sig.name} at unit "
        f"{target} + {delay:.3f} s; give it more work\n{out_text}\n{err_text}"
    )
    return Stopped(
        sig, target, delay, proc.returncode, out_text, err_text, time.monotonic() - start
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _units(case: Case, out: Path) -> int:
    try:
        return case.units(out)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):  # mid-write: look again
        return 0


def plan_targets(rng: random.Random, total: int, n: int) -> list[int]:
    """n increasing unit targets in [1, total - 2]: each stop leaves work after it."""
    assert total - 2 >= n, f"{total} units are too few for {n} stops; give the command more work"
    return sorted(rng.sample(range(1, total - 1), n))


def assert_clean_stop(case: Case, stopped: Stopped, out: Path) -> None:
    """Exit 130, no traceback, one last line that says how to go on; the manifest says
    interrupted."""
    from potstill.cli.app import INTERRUPTED_LINE

    assert stopped.returncode == 130, (stopped.returncode, stopped.stderr)
    assert "Traceback" not in stopped.stderr, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == INTERRUPTED_LINE, stopped.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attempts"][-1]["status"] == "interrupted"


# --- record-producing commands ------------------------------------------------------------------


def assert_partial_records(case: Case, out: Path, expected: dict[str, dict]) -> set[str]:
    """Every record on disk is whole, written once, and the one the uninterrupted run wrote."""
    partial = case.partial(out)
    ids = [r["id"] for r in partial]
    assert len(ids) == len(set(ids)), f"{case.name}: duplicated ids on disk"
    for record in partial:
        assert record == expected[record["id"]], f"{case.name}: {record['id']} differs"
    return set(ids)


def shown_done(stdout: str, label: str) -> tuple[int, int]:
    """(M, N) of the last `label ... M/N` progress line the command printed."""
    import re

    lines = [line for line in stdout.splitlines() if line.startswith(label)]
    assert lines, f"no '{label}' progress line in:\n{stdout}"
    done, total = re.search(r"(\d+)/(\d+)", lines[-1]).groups()
    return int(done), int(total)


# --- training commands --------------------------------------------------------------------------


def checkpoint_steps(out: Path) -> list[int]:
    """The steps of the complete checkpoints under `out/checkpoints`."""
    ckpts = out / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(
        int(p.name[5:])
        for p in ckpts.iterdir()
        if p.name.startswith("step-") and (p / "state.json").is_file()
    )


def last_checkpoint(out: Path) -> int:
    steps = checkpoint_steps(out)
    return steps[-1] if steps else 0


def metrics_lines(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same_metrics(expected_path: Path, got_path: Path) -> None:
    """Every step's logged values equal the uninterrupted run's (last entry per step wins),
    exactly: the resumed run restores weights, optimizer, scheduler, RNG and data position."""
    expected, got = read_metrics(expected_path), read_metrics(got_path)
    assert sorted(got) == sorted(expected)
    for step, values in expected.items():
        for key, value in values.items():
            if key != "tokens_per_s":  # wall-clock
                assert got[step][key] == value, (step, key, got[step][key], value)


def assert_same_tensors(expected_dir: Path, got_dir: Path) -> None:
    """Every safetensors file under `expected_dir` has an equal twin under `got_dir`."""
    import torch
    from safetensors.torch import load_file

    files = sorted(p.relative_to(expected_dir) for p in expected_dir.rglob("*.safetensors"))
    assert files, f"no weights in {expected_dir}"
    for rel in files:
        a, b = load_file(expected_dir / rel), load_file(got_dir / rel)
        assert sorted(a) == sorted(b), rel
        for name in a:
            assert torch.equal(a[name], b[name]), (rel, name)


# --- the chain ----------------------------------------------------------------------------------


def run_chain(case: Case, model_dir: Path, tmp_path: Path) -> None:
    """The reference run, then stop/rerun for each of `case.stops` on one output directory, then
    a last rerun to the end; check each stop and the end against the reference."""
    overrides = case.setup(model_dir, tmp_path)
    reference = tmp_path / "reference"
    total, unit_seconds = timed_reference(case, overrides, reference)
    rng = random.Random(f"{case.seed}-{case.name}")
    targets = plan_targets(rng, total, len(case.stops))

    out = tmp_path / "stopped"
    check = RecordChecks if case.kind == "records" else TrainingChecks
    state = check.start(case, reference)
    for sig, target in zip(case.stops, targets, strict=True):
        target = max(target, case.units(out) + 1) if out.exists() else target
        assert target < total, f"{case.name}: an earlier stop left no work for this one"
        delay = rng.uniform(0, unit_seconds)
        stopped = stop_at(case, overrides, out, sig=sig, target=target, delay=delay)
        if sig in CLEAN:
            assert_clean_stop(case, stopped, out)
        else:
            assert stopped.returncode == -signal.SIGKILL
        assert case.units(out) < total, f"{case.name}: stopped after its work was done"
        check.stopped(case, stopped, out, state)
        rerun_before = check.before_rerun(case, out)
        # Chained: the next stop is this rerun (or the final rerun, below).
        state = {**state, "rerun": rerun_before}
    proc = run_to_end(case, overrides, out)
    check.finished(case, proc, out, reference, state)


def timed_reference(case: Case, overrides: list[str], out: Path) -> tuple[int, float]:
    """Run the reference (in this process) while a thread watches its units appear; return the
    total units and the median time between two (the stops' delays are fractions of it)."""
    seen, done = [], threading.Event()

    def watch() -> None:
        last = 0
        while not done.is_set():
            if (now := _units(case, out)) > last:
                seen.append(time.perf_counter())
                last = now
            time.sleep(POLL_SECONDS)

    watcher = threading.Thread(target=watch, daemon=True)
    start = time.perf_counter()
    watcher.start()
    try:
        case.reference([*overrides, f"run.output_dir={out}"])
    finally:
        done.set()
        watcher.join()
    total = case.units(out)
    gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    return total, statistics.median(gaps) if gaps else (time.perf_counter() - start) / total


class RecordChecks:
    """generate, curate, teacher cache: the records on disk are the reference's, each once."""

    @staticmethod
    def start(case, reference):
        return {"expected": {r["id"]: r for r in case.partial(reference)}}

    @staticmethod
    def stopped(case, stopped, out, state):
        on_disk = assert_partial_records(case, out, state["expected"])
        assert len(on_disk) < len(state["expected"]), f"{case.name}: nothing left to resume"
        if stopped.signal in CLEAN and case.progress:
            # Flushed on the way out: everything the progress bar counted is on disk.
            # A bar counts this attempt's work (of N) and may start at what was done before.
            shown, of = shown_done(stopped.stdout, case.progress)
            assert len(on_disk) >= shown + len(state["expected"]) - of, (len(on_disk), shown, of)

    @staticmethod
    def before_rerun(case, out):
        return {}

    @staticmethod
    def finished(case, proc, out, reference, state):
        assert case.final(out) == case.final(reference)


class TrainingChecks:
    """sft, distill, rlt train: resumed at the last checkpoint; the same metrics and weights
    (and reference snapshots, where a run keeps them) at the end."""

    @staticmethod
    def start(case, reference):
        return {}

    @staticmethod
    def stopped(case, stopped, out, state):
        if "rerun" in state:  # this attempt resumed from the last checkpoint of the one before
            assert_resumed_from(stopped.stdout, out, state["rerun"])
        if stopped.signal in CLEAN:
            # Stopped at the last finished step, and checkpointed there.
            logged = max(m["step"] for m in metrics_lines(out))
            assert checkpoint_steps(out)[-1] == logged, (checkpoint_steps(out), logged)

    @staticmethod
    def before_rerun(case, out):
        return {"step": last_checkpoint(out), "lines": len(metrics_lines(out))}

    @staticmethod
    def finished(case, proc, out, reference, state):
        assert_resumed_from(proc.stdout, out, state["rerun"])
        assert_same_metrics(reference / "metrics.jsonl", out / "metrics.jsonl")
        assert_same_tensors(reference / "final", out / "final")
        step = f"step-{last_checkpoint(reference):06d}"
        assert_same_tensors(reference / "checkpoints" / step, out / "checkpoints" / step)
        if (reference / "reference").is_dir():  # rlt train's re-synced reference weights
            assert_same_tensors(reference / "reference", out / "reference")


def assert_resumed_from(stdout: str, out, before: dict) -> None:
    """The rerun started at the last checkpoint: it said so, and its first logged step is the
    one after it."""
    step = before["step"]
    if step:
        assert f"(step {step} of" in " ".join(stdout.split()), stdout
    new = metrics_lines(out)[before["lines"] :]
    if new:
        assert new[0]["step"] == step + 1, (step, [m["step"] for m in new])
