"""`engine: ray` for `eval` and `rlt explain` on a real local Ray cluster (2 CPU workers, the
tiny models of conftest): the local answer and explanation files byte for byte, the same eval
results, the cost the pool can measure, answers lost on Ray listed and not scored, and Ray
missing or misconfigured as one line. Helpers and `no_ray_left` come from test_ray_engine."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from potstill.config import from_dict
from potstill.data import read_shards, write_records
from potstill.errors import ConfigError, ModelError
from potstill.stages.eval import RAY_COST, EvalConfig, run_eval
from potstill.stages.rlt_explain import RLTExplainConfig, run_explain

from .conftest import assert_one_line_error, run_cli
from .test_ray_engine import (
    RAY,
    files,
    no_ray_left,  # noqa: F401 (the fixture, found by name)
    quiet,
    without_ray_env,
)

TASK = "rg:basic_arithmetic?size=12&seed=5"
QUESTIONS = [
    {"id": f"q{i}", "question": f"What is {i} + 25?", "solution": f"{i} + 25 = {i + 25}"}
    for i in range(6)
]


def eval_config(model_dir, out, engine, **generation) -> EvalConfig:
    return from_dict(
        EvalConfig,
        {
            "models": [{"name": str(model_dir), "label": "tiny"}],
            "tasks": [{"source": TASK, "name": "arith"}],
            "generation": {"max_new_tokens": 8, "num_samples": 1, "temperature": 0.0,
                           "batch_size": 4, "system_prompt": None, **generation},
            "ks": [1], "run": {"output_dir": str(out)}, "engine": engine, "ray": RAY,
        },
    )  # fmt: skip


def explain_config(model_dir, data, out, engine) -> RLTExplainConfig:
    return from_dict(
        RLTExplainConfig,
        {
            "teacher": {"name": str(model_dir), "device": "cpu"},
            "student": {"name": str(model_dir), "device": "cpu"},
            "data": {"source": str(data)},
            "sampling": {"num_explanations": 2, "max_new_tokens": 8, "temperature": 1.0,
                         "batch_size": 4},
            "select": "best", "tags": {"explanation_end": "t"},
            "teacher_system_prompt": None, "student_system_prompt": None,
            "run": {"output_dir": str(out)}, "engine": engine, "ray": RAY,
        },
    )  # fmt: skip


def answers(out: Path) -> dict[str, bytes]:
    return files(out / "answers" / "tiny" / "arith", "part-*.jsonl")


@pytest.mark.slow
@pytest.mark.usefixtures("no_ray_left")
def test_eval_on_ray_writes_the_local_answers_and_results(tiny_model_dir, tmp_path):
    local = run_eval(eval_config(tiny_model_dir, tmp_path / "local", "local"), quiet())
    printed = io.StringIO()
    on_ray = run_eval(
        eval_config(tiny_model_dir, tmp_path / "ray", "ray"), Console(file=printed, width=400)
    )
    expected = answers(tmp_path / "local")
    assert len(expected) == 3  # 12 greedy answers, one shard per batch of 4
    assert answers(tmp_path / "ray") == expected
    assert on_ray["results"] == local["results"] and on_ray["results"][0]["n"] == 12
    assert on_ray["generation"] == local["generation"]
    (cost,), (local_cost,) = on_ray["models"], local["models"]
    assert cost["engine"] == "ray" and "engine" not in local_cost
    assert cost["params"] == local_cost["params"] > 0  # counted in an actor
    assert cost["disk_bytes"] == local_cost["disk_bytes"]
    assert cost["peak_memory_bytes"] is None  # the actors' memory, not measured here
    for key in ("tokens_per_s", "seconds_per_answer", "latency_s", "load_seconds"):
        assert cost[key] > 0, key
    assert RAY_COST.format(workers=2) in printed.getvalue().replace("\n", "")
    saved = json.loads((tmp_path / "ray" / "cost" / "tiny.json").read_text())
    assert saved == {k: v for k, v in cost.items() if k != "label"}
    assert not (tmp_path / "ray" / "failed.jsonl").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("no_ray_left")
def test_rlt_explain_on_ray_writes_the_local_explanations(tiny_model_dir, tmp_path):
    data = write_records(tmp_path / "q.jsonl", QUESTIONS)
    local = run_explain(explain_config(tiny_model_dir, data, tmp_path / "local", "local"), quiet())
    on_ray = run_explain(explain_config(tiny_model_dir, data, tmp_path / "ray", "ray"), quiet())
    expected = files(tmp_path / "local" / "explanations", "part-*.jsonl")
    assert len(expected) == 3  # 12 sampled explanations, 4 a shard
    assert files(tmp_path / "ray" / "explanations", "part-*.jsonl") == expected
    for name in ("scored.jsonl", "explained.jsonl"):  # scored here, by the teacher loaded here
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert on_ray == local and "failed" not in on_ray
    assert local["explanations"] == 12 and 0 < local["kept"] <= 6


class Lossy:
    """A local backend that loses the answers `lost` as Ray does a batch that failed every
    retry: left out of the results and kept in `failed`."""

    def __init__(self, backend, lost: list[str]):
        self.inner, self.lost, self.failed = backend, lost, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, requests, sampling):
        from potstill.teacher.ray_pool import Failed

        if not self.failed and any(r.key in self.lost for r in requests):
            self.failed.append(Failed(list(self.lost), "ActorDiedError: gone"))
        yield from self.inner.generate([r for r in requests if r.key not in self.lost], sampling)


def test_answers_lost_on_ray_are_listed_and_not_scored_until_a_rerun(
    tiny_model_dir, tmp_path, monkeypatch
):
    import potstill.teacher.engines as engines

    opened = engines.open_backend
    lost = ["rg-basic_arithmetic-s5-3#0", "rg-basic_arithmetic-s5-7#0"]
    monkeypatch.setattr(engines, "open_backend", lambda *a, **k: Lossy(opened(*a, **k), lost))
    out = tmp_path / "ev"
    with pytest.raises(ModelError, match=r"engine: ray: 2 answers failed every retry"):
        run_eval(eval_config(tiny_model_dir, out, "local"), quiet())
    rows = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert rows == [
        {"model": "tiny", "task": "arith", "id": key, "error": "ActorDiedError: gone"}
        for key in lost
    ]
    answered = {r["id"] for r in read_shards(out / "answers" / "tiny" / "arith")}
    assert len(answered) == 10 and not answered & set(lost)  # the rest was answered
    assert not (out / "eval.json").exists()  # no accuracy over part of the answers
    monkeypatch.setattr(engines, "open_backend", opened)
    report = run_eval(eval_config(tiny_model_dir, out, "local"), quiet())
    assert report["results"][0]["n"] == 12 and not (out / "failed.jsonl").exists()


@pytest.mark.parametrize("verb", ["eval", "rlt explain"])
def test_eval_and_explain_without_ray_are_one_line(verb, tiny_model_dir, tmp_path):
    data = write_records(tmp_path / "q.jsonl", QUESTIONS)
    sets = {
        "eval": [f"models=[{{name: '{tiny_model_dir}'}}]", f"tasks=[{{source: '{TASK}'}}]"],
        "rlt explain": [f"teacher.name={tiny_model_dir}", f"data.source={data}"],
    }[verb]
    out = tmp_path / "out"
    args = [f"--set={s}" for s in [*sets, f"run.output_dir={out}", "engine=ray"]]
    proc = run_cli(*verb.split(), *args, env=without_ray_env(tmp_path))
    assert_one_line_error(proc, "engine: ray needs Ray", "pip install 'potstill[ray]'")
    assert proc.returncode == 2 and not out.exists()  # refused before the run directory


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"engine": "spark"}, "engine: 'spark' is not one of 'local', 'ray'"),
        ({"ray": {"num_workers": 0}}, "ray.num_workers: must be a positive integer, got 0"),
        ({"ray": {"address": " "}}, "ray.address: empty"),
    ],
)
def test_bad_ray_settings_of_eval_and_explain_are_one_line(override, fragment):
    for config in (EvalConfig, RLTExplainConfig):
        with pytest.raises(ConfigError) as info:
            from_dict(config, override)
        assert fragment in str(info.value) and "\n" not in str(info.value)
