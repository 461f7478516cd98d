"""`engine: ray` joining a cluster it did not start (`ray.address`): a head from `ray start`, the
same files as the local engine, the cluster left running; an address nothing answers at refused
in one line at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from potstill.stages.generate import run_generate

from .conftest import assert_one_line_error, kill_group, run_cli
from .test_ray_engine import SOURCE, cli_args, files, gen_config, no_ray_left, quiet

__all__ = ["no_ray_left"]  # the fixture, used here by name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start ended early"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"no Ray head on port {port} after {seconds} s")


@pytest.mark.slow
def test_generate_joins_a_running_cluster_and_leaves_it_running(
    tiny_model_dir, tmp_path, no_ray_left
):
    import potstill

    port = free_port()
    # the cluster's workers import this checkout's potstill, as an installed node's would; the
    # driver runs as a fresh CLI process with the head's auth mode (an earlier ray.init in this
    # process switched it to tokens for this process and its children)
    auth = {"RAY_AUTH_MODE": "disabled"}
    path = str(Path(potstill.__file__).resolve().parents[1])
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, **auth, "PYTHONPATH": path},
    )  # fmt: skip
    try:
        wait_for_port(port, head)
        local = gen_config(tiny_model_dir, tmp_path / "local", "local", max_new_tokens=24)
        run_generate(local, quiet())
        args = [
            *cli_args(tiny_model_dir, tmp_path / "ray", SOURCE),
            "--set",
            f"ray.address=127.0.0.1:{port}",
        ]
        proc = run_cli(*args, env=auth)
        assert proc.returncode == 0, proc.stderr[-3000:]
        expected = files(tmp_path / "local" / "samples", "part-*.jsonl")
        assert len(expected) == 12
        assert files(tmp_path / "ray" / "samples", "part-*.jsonl") == expected
        assert head.poll() is None  # not this job's cluster: left running
    finally:
        kill_group(head)
        head.wait(timeout=60)
        current = Path("/tmp/ray/ray_current_cluster")  # `ray start`'s note of its address
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_an_address_nothing_answers_at_is_one_line_at_once(tiny_model_dir, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # bound once, then closed: nothing listens there
    args = [*cli_args(tiny_model_dir, tmp_path / "out", SOURCE), "--set", f"ray.address={address}"]
    start = time.monotonic()
    proc = run_cli(*args)
    assert_one_line_error(proc, f"ray.address: nothing answers at {address}", "ray start --head")
    assert time.monotonic() - start < 60  # Ray alone retries for minutes
    assert not (tmp_path / "out").exists()
