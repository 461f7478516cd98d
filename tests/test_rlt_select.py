"""Best of N by the RLT reward, for any teacher's traces: curate's select.order = rlt_reward."""

from __future__ import annotations

import pytest
from rich.console import Console

from potstill.config import load_config
from potstill.curate.select import select_per_question
from potstill.data import read_records, write_records
from potstill.errors import ConfigError
from potstill.rlt.score import score_records
from potstill.stages.curate import CurateConfig, run_curate

TRACES = ["Add 1 and 2: 3.", "One plus two makes three, so 3.", "3", "Two more than one is 3."]


def _samples(n_questions=2):
    return [
        {
            "id": f"q{q}#{k}", "source_id": f"q{q}", "question": f"What is {q} + 2?",
            "answer": str(q + 2),
            "task": "regex", "completion": text.replace("3", str(q + 2)),
            "completion_tokens": len(text.split()), "finish_reason": "stop",
        }
        for q in range(n_questions)
        for k, text in enumerate(TRACES)
    ]  # fmt: skip


def test_the_highest_reward_wins_ties_go_to_the_shorter_and_unscored_come_last():
    rows = [
        {"id": "a#0", "source_id": "a", "completion": "x y z", "rlt_reward": -3.0},
        {"id": "a#1", "source_id": "a", "completion": "x", "rlt_reward": -1.0},
        {"id": "a#2", "source_id": "a", "completion": "x y", "rlt_reward": -1.0},
        {"id": "a#3", "source_id": "a", "completion": "w"},  # too long to score: no reward
    ]
    kept, dropped = select_per_question(rows, k=3, order="rlt_reward")
    assert [r["id"] for r in kept] == ["a#1", "a#2", "a#0"]
    assert [(r["id"], r["drop_reason"]) for r in dropped] == [("a#3", "over_k")]


def _config(tmp_path, model_dir, src, *extra):
    sets = [
        f"data.source={src}", "select.order=rlt_reward", "select.k=1",
        "format.drop_truncated=false", f"run.output_dir={tmp_path / 'curated'}",
        "run.log_with=[]", *extra,
    ]  # fmt: skip
    return load_config(CurateConfig, overrides=sets)


def test_curate_keeps_the_trace_that_best_teaches_the_student(tiny_model_dir, tmp_path):
    src = write_records(tmp_path / "samples.jsonl", _samples())
    rlt = [
        f"rlt.teacher.name={tiny_model_dir}", f"rlt.student.name={tiny_model_dir}",
        "rlt.fields.explanation=completion", "rlt.fields.solution=answer",
        "rlt.teacher_system_prompt=null", "rlt.student_system_prompt=null",
    ]  # fmt: skip
    run_curate(_config(tmp_path, tiny_model_dir, src, *rlt), Console(quiet=True))
    kept = read_records(tmp_path / "curated" / "kept.jsonl")
    # The reference: every trace scored on its own, the best per question.
    from potstill.models import load_model, load_tokenizer
    from potstill.rlt.score import RLTFields

    pair = (load_model(tiny_model_dir, device="cpu"), load_tokenizer(tiny_model_dir))
    scored = score_records(
        read_records(src), pair, pair, teacher_system_prompt=None, student_system_prompt=None,
        fields=RLTFields(explanation="completion", solution="answer"),
    )  # fmt: skip
    best = {}
    for r in scored:
        q = r["id"].split("#")[0]
        if q not in best or r["rlt_reward"] > best[q]["rlt_reward"]:
            best[q] = r
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in best.values())
    for r in kept:
        assert r["rlt_reward"] == pytest.approx(best[r["id"].split("#")[0]]["rlt_reward"], abs=1e-5)
    rewards = sorted({round(r["rlt_reward"], 4) for r in scored})
    assert len(rewards) > 2  # the traces really differ in reward: the choice is not a tie


def test_rlt_reward_order_without_scores_or_scorer_is_refused_up_front(tiny_model_dir, tmp_path):
    src = write_records(tmp_path / "samples.jsonl", _samples(1))
    with pytest.raises(
        ConfigError, match="select.order=rlt_reward: the records carry no rlt_reward"
    ):
        run_curate(_config(tmp_path, tiny_model_dir, src), Console(quiet=True))
    assert not (tmp_path / "curated").exists()
