"""`run.log_with`: a tracker that is not installed is refused in one line before any model loads
(accelerate would drop it with a warning and train on, logging nothing); one that cannot start
is one line too; and W&B (offline) and MLflow (file store) receive the scalars TensorBoard and
metrics.jsonl get, step by step, read back from their own files."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest

from potstill.config.sections import RunConfig
from potstill.data import write_records
from potstill.errors import ConfigError
from potstill.train.loop import read_metrics
from potstill.train.processes import start_trackers

from .conftest import assert_one_line_error, run_cli

SCALARS = ("loss", "ce", "lr", "grad_norm", "tokens_per_s")
HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None


def _records(tmp_path: Path) -> Path:
    rows = [{"id": f"r{i}", "question": f"{i} + {i}?", "completion": f"{2 * i}"} for i in range(6)]
    return write_records(tmp_path / "kept.jsonl", rows)


def _sft(model, data, out, log_with: str, env=None):
    return run_cli(
        "sft", "--set", f"model.name={model}", "--set", f"data.source={data}",
        "--set", "data.system_prompt=null", "--set", "train.max_steps=3",
        "--set", "train.micro_batch_size=2", "--set", "train.lr=0.01",
        "--set", f"run.log_with={log_with}", "--set", f"run.output_dir={out}", env=env,
    )  # fmt: skip


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_not_installed_is_refused_before_the_model_loads(tracker, tmp_path):
    """The CLI with `tracker` made unimportable (as if not installed) and a model that does not
    exist: the tracker is what is refused, so nothing was loaded, and no run directory made."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(f"import sys\nsys.modules[{tracker!r}] = None\n")
    path = os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])
    out = tmp_path / "run"
    proc = _sft(
        tmp_path / "no-such-model", _records(tmp_path), out, f"[tensorboard, {tracker}]",
        env={"PYTHONPATH": path},
    )  # fmt: skip
    line = assert_one_line_error(proc)
    assert line == (
        f"error: run.log_with: {tracker} is not installed; pip install 'potstill[{tracker}]' "
        "or drop it from run.log_with"
    )
    assert not out.exists()


def test_the_python_api_refuses_it_too(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="wandb is not installed"):
        RunConfig(log_with=["tensorboard", "wandb"])
    assert RunConfig(log_with=["tensorboard"]).log_with == ["tensorboard"]


def test_a_tracker_that_cannot_start_is_one_line():
    class Accelerator:
        log_with = ["wandb"]

        def init_trackers(self, name):
            raise RuntimeError("api_key not configured (no-tty)\ncall wandb.login")

    with pytest.raises(ConfigError) as info:
        start_trackers(Accelerator())
    assert str(info.value) == (
        "run.log_with: starting the trackers (wandb) failed: RuntimeError: api_key not "
        "configured (no-tty); fix the tracker's settings or drop it from run.log_with"
    )


def _tensorboard(run: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run / "logs").rglob("events.out.tfevents*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    steps: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            steps.setdefault(event.step, {})[tag] = event.value
    return steps


def _wandb_records(path: str):
    """The records of a `.wandb` file, parsed with wandb's own protobuf schema. Its framing is
    LevelDB's log format: a 7-byte file header, 32 KiB blocks, each chunk with a CRC-32 (over
    its type byte and data, checked here), length and type (1 whole, 2 first, 3 middle,
    4 last). wandb >= 0.2x reads these files in its Go core and ships no Python reader."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"corrupt chunk at {pos}"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb(root: Path) -> tuple[dict[int, dict[str, float]], set[str]]:
    (path,) = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    steps, kinds = {}, set()
    for record in _wandb_records(path):
        kinds.add(record.WhichOneof("record_type"))
        if record.WhichOneof("record_type") == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            steps[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return steps, kinds


def _mlflow(root: Path) -> dict[int, dict[str, float]]:
    steps: dict[int, dict[str, float]] = {}
    for metric in root.glob("*/*/metrics/*"):
        for line in metric.read_text().splitlines():
            _timestamp, value, step = line.split()
            steps.setdefault(int(step), {})[metric.name] = float(value)
    return steps


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    """A 3-step sft logging to TensorBoard and whichever of W&B (offline) and MLflow (a file
    store) are installed, each writing under the test's own directory."""
    tmp = tmp_path_factory.mktemp("trackers")
    trackers = ["tensorboard"] + ["wandb"] * HAS_WANDB + ["mlflow"] * HAS_MLFLOW
    env = {
        "WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wb"), "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
    }  # fmt: skip
    (tmp / "wb").mkdir()
    out = tmp / "run"
    proc = _sft(tiny_model_dir, _records(tmp), out, f"[{', '.join(trackers)}]", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    metrics = read_metrics(out / "metrics.jsonl")
    assert sorted(metrics) == [1, 2, 3]
    tensorboard = _tensorboard(out)
    assert sorted(tensorboard) == [1, 2, 3]
    for step, row in metrics.items():  # TensorBoard keeps float32
        assert tensorboard[step] == {k: pytest.approx(row[k], rel=1e-6) for k in SCALARS}
    return tmp, metrics


@pytest.mark.slow
@pytest.mark.skipif(not HAS_WANDB, reason="wandb not installed: pip install 'potstill[wandb]'")
def test_wandb_offline_gets_every_scalar_of_every_step(tracked_run):
    tmp, metrics = tracked_run
    steps, kinds = _wandb(tmp / "wb")
    assert sorted(steps) == [1, 2, 3]
    for step, row in metrics.items():
        assert steps[step] == {k: pytest.approx(row[k], rel=1e-12) for k in SCALARS}
    assert "exit" in kinds  # the run was finished (teardown), not left open


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow not installed: pip install 'potstill[mlflow]'")
def test_mlflow_file_store_gets_every_scalar_of_every_step(tracked_run):
    tmp, metrics = tracked_run
    steps = _mlflow(tmp / "mlruns")
    assert sorted(steps) == [1, 2, 3]
    for step, row in metrics.items():
        assert steps[step] == {k: pytest.approx(row[k], rel=1e-12) for k in SCALARS}
