"""`engine: ray` for `rlt score` on a real local Ray cluster (2 CPU workers, the tiny models of
conftest): the local scored file byte for byte, records of a batch that failed every retry left
out and listed (a rerun scores them and clears the list), and Ray missing or misconfigured as one
line. Helpers and `no_ray_left` come from test_ray_engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from potstill.config import from_dict
from potstill.data import read_records, write_records
from potstill.errors import ConfigError
from potstill.stages.rlt_score import RLTScoreConfig, failed_path, run_score

from .conftest import assert_one_line_error, run_cli
from .test_ray_engine import (
    RAY,
    no_ray_left,  # noqa: F401 (the fixture, found by name)
    quiet,
    without_ray_env,
)

EXPLAINED = [
    {"id": f"q{i}#{n}", "question": f"What is {i} + 25?", "solution": f"{i + 25}",
     "explanation": f"Add {i} and 25{'.' * n}" + ("" if (i + n) % 3 else " then stop</t>"),
     "explanation_closed": (i + n) % 4 != 1}
    for i in range(5) for n in range(3)
]  # fmt: skip
"""15 explanations, three per question (one batch of 4 spans two questions), some unclosed."""


def score_config(model_dir, engine, ray=RAY) -> RLTScoreConfig:
    return from_dict(
        RLTScoreConfig,
        {
            "teacher": {"name": str(model_dir), "device": "cpu"},
            "student": {"name": str(model_dir), "device": "cpu"},
            "batch_size": 4, "tags": {"explanation_end": "</t>"},
            "teacher_system_prompt": None, "student_system_prompt": None,
            "engine": engine, "ray": ray,
        },
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("no_ray_left")
def test_rlt_score_on_ray_writes_the_local_file_byte_for_byte(tiny_model_dir, tmp_path):
    source = write_records(tmp_path / "in.jsonl", EXPLAINED)
    local = run_score(
        score_config(tiny_model_dir, "local"), source, tmp_path / "local.jsonl", quiet()
    )
    on_ray = run_score(score_config(tiny_model_dir, "ray"), source, tmp_path / "ray.jsonl", quiet())
    expected = (tmp_path / "local.jsonl").read_bytes()
    assert (tmp_path / "ray.jsonl").read_bytes() == expected
    assert on_ray == local and "failed" not in on_ray
    assert local["records"] == 15 and local["scored"] == 15 and 0 < local["unclosed"] < 15
    assert not failed_path(tmp_path / "ray.jsonl").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("no_ray_left")
def test_a_batch_failing_every_retry_is_listed_and_a_rerun_scores_it(
    tiny_model_dir, tmp_path, monkeypatch
):
    import potstill.rlt.ray_score as ray_score
    from potstill.teacher.ray_pool import Failed

    real_run = ray_score.Pool.run

    def losing_batch_1(self, method, batches, *args):  # as Ray returns a batch lost for good
        for index, result in real_run(self, method, batches, *args):
            lost = Failed([key for key, _ in batches[index]], "ActorDiedError: gone")
            yield index, lost if index == 1 else result

    source = write_records(tmp_path / "in.jsonl", EXPLAINED)
    out, listed = tmp_path / "scored.jsonl", tmp_path / "scored.failed.jsonl"
    run_score(score_config(tiny_model_dir, "local"), source, tmp_path / "local.jsonl", quiet())
    monkeypatch.setattr(ray_score.Pool, "run", losing_batch_1)
    cfg = score_config(tiny_model_dir, "ray", {**RAY, "num_workers": 1})
    stats = run_score(cfg, source, out, quiet())
    rows = [json.loads(line) for line in listed.read_text().splitlines()]
    assert len(rows) == 4 == stats["failed"] and all(
        r["error"] == "ActorDiedError: gone" for r in rows
    )
    lost = {r["id"] for r in rows}
    written = [r["id"] for r in read_records(out)]
    assert stats["records"] == len(written) == 11 and not lost & set(written)
    assert [r["id"] for r in EXPLAINED if r["id"] not in lost] == written  # input order
    monkeypatch.setattr(ray_score.Pool, "run", real_run)
    again = run_score(cfg, source, out, quiet())
    assert "failed" not in again and not listed.exists()
    assert out.read_bytes() == (tmp_path / "local.jsonl").read_bytes()


def test_rlt_score_on_ray_without_ray_is_one_line(tiny_model_dir, tmp_path):
    source = write_records(tmp_path / "in.jsonl", EXPLAINED[:2])
    out = tmp_path / "out.jsonl"
    proc = run_cli(
        "rlt", "score", "--teacher", str(tiny_model_dir), "--student", str(tiny_model_dir),
        "--in", str(source), "--out", str(out), "--set", "engine=ray",
        env=without_ray_env(tmp_path),
    )  # fmt: skip
    assert_one_line_error(proc, "engine: ray needs Ray", "pip install 'potstill[ray]'")
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"engine": "spark"}, "engine: 'spark' is not one of 'local', 'ray'"),
        ({"ray": {"num_workers": 0}}, "ray.num_workers: must be a positive integer, got 0"),
        ({"ray": {"max_task_retries": -1}}, "ray.max_task_retries: must be >= 0, got -1"),
        ({"ray": {"address": " "}}, "ray.address: empty"),
    ],
)
def test_bad_ray_settings_of_rlt_score_are_one_line(override, fragment):
    with pytest.raises(ConfigError) as info:
        from_dict(RLTScoreConfig, override)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_the_failed_list_sits_beside_the_output_under_its_own_name():
    assert failed_path("runs/x/scored.jsonl") == Path("runs/x/scored.failed.jsonl")
    assert failed_path("out.parquet") == Path("out.failed.jsonl")
