"""`potstill eval`: pass@k / maj@k against hand-computed cases, cost numbers, overlap refusal,
gold answers the verifier rejects, and resume."""

from __future__ import annotations

import json

import pytest

from potstill.config import load_config
from potstill.data import read_records, read_shards, write_records
from potstill.data.verifiers import check_gold
from potstill.errors import ConfigError, DataError
from potstill.eval.bench import maj_at_k, pass_at_k, score_samples
from potstill.eval.cost import price_per_1k_answers
from potstill.eval.results import answers_dir
from potstill.stages.eval import EvalConfig, run_eval

from .conftest import assert_one_line_error, run_cli


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(3, 1, 3) == 1.0
    with pytest.raises(ValueError, match="k=5 must be in"):
        pass_at_k(4, 1, 5)


def test_maj_at_k_votes_over_the_first_k_answers():
    answers = ["7", "8", "8", "7 ", None]
    correct = [True, False, False, True, False]
    assert maj_at_k(answers, correct, 1) is True
    assert maj_at_k(answers, correct, 3) is False  # 8 wins 2:1
    assert maj_at_k(answers, correct, 4) is True  # 2:2, "7" seen first wins the tie
    assert maj_at_k([None, None], [False, False], 2) is False  # nobody answered
    assert maj_at_k([None, "5"], [False, True], 2) is True  # no answer abstains


def test_score_samples_aggregates_per_question():
    def s(q, k, ans, ok):
        return {"source_id": q, "sample": k, "answer_given": ans, "verified": ok}

    samples = [s("a", 0, "1", True), s("a", 1, "2", False),
               s("b", 0, "3", False), s("b", 1, "3", False)]  # fmt: skip
    result = score_samples(samples, [1, 2])
    assert result["n"] == 2 and result["samples"] == 2 and result["correct"] == 1
    assert result["accuracy"] == 0.25  # (1/2 + 0/2) / 2
    assert result["pass@k"] == {"1": 0.25, "2": 0.5}
    assert result["maj@k"] == {"1": 0.5, "2": 0.5}  # a: tie 1:1 -> "1" first, correct
    with pytest.raises(ValueError, match="different sample counts"):
        score_samples(samples[:3], [1])


def test_price_per_1k_answers():
    assert price_per_1k_answers(3.6, 1.0) == pytest.approx(1.0)  # 3.6 s × 1000 = 1 hour


def test_check_gold_names_the_record_the_verifier_rejects():
    records = read_records("rg:basic_arithmetic?size=3&seed=1")
    check_gold(records, "src")  # reasoning-gym's own answers pass
    math = [{"id": "m1", "question": "1+1?", "answer": "2", "task": "math"},
            {"id": "m2", "question": "?", "answer": "two apples", "task": "math"}]  # fmt: skip
    with pytest.raises(DataError, match="record 'm2': math-verify cannot parse"):
        check_gold(math, "src")
    with pytest.raises(DataError, match="record 'r1': answer '\\[' is not a valid regex"):
        check_gold([{"id": "r1", "question": "?", "answer": "[", "task": "regex"}], "src")


def _cfg(model_dir, out, *extra):
    return load_config(
        EvalConfig,
        None,
        [
            f"models=[{{name: '{model_dir}', label: tiny}}, "
            f"{{name: '{model_dir}', label: big, role: teacher}}]",
            "tasks=[{source: 'rg:basic_arithmetic?size=4&seed=5', name: arith}]",
            "generation.max_new_tokens=4",
            "generation.num_samples=2",
            "generation.temperature=1.0",
            "generation.system_prompt=null",
            "ks=[1, 2]",
            f"run.output_dir={out}",
            *extra,
        ],
    )


def test_eval_writes_results_and_positive_costs_then_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "ev"
    report = run_eval(_cfg(tiny_model_dir, out))
    saved = json.loads((out / "eval.json").read_text())
    assert saved == report
    assert [(r["model"], r["task"], r["n"], r["samples"]) for r in report["results"]] == [
        ("tiny", "arith", 4, 2),
        ("big", "arith", 4, 2),
    ]
    for model in report["models"]:
        for key in ("params", "disk_bytes", "peak_memory_bytes", "tokens_per_s",
                    "seconds_per_answer", "latency_s", "usd_per_1k_answers"):  # fmt: skip
            assert model[key] > 0, (key, model)
    assert report["models"][1]["role"] == "teacher"
    # Kill-and-rerun equivalent: drop one model's answers; the rerun answers only those.
    tiny_answers = answers_dir(out, "tiny", "arith")
    kept = sorted(read_shards(tiny_answers), key=lambda r: r["id"])
    for shard in tiny_answers.glob("part-*.jsonl"):
        shard.unlink()
    write_records(tiny_answers / "part-00000.jsonl", kept[:5])
    again = run_eval(_cfg(tiny_model_dir, out))
    answers = sorted(read_shards(tiny_answers), key=lambda r: r["id"])
    assert [a["id"] for a in answers] == [k["id"] for k in kept]  # every sample exactly once
    assert answers[:5] == kept[:5]
    assert again["models"][1] == report["models"][1]  # big was done: its cost is kept


def test_eval_refuses_questions_seen_in_training(tiny_model_dir, tmp_path):
    train = tmp_path / "kept.jsonl"
    record = read_records("rg:basic_arithmetic?size=4&seed=5")[2]
    write_records(train, [{**record, "id": "other-id#0", "source_id": "other-id"}])
    with pytest.raises(ConfigError, match=r"exclude: 1 of 4 questions of task 'arith'"):
        run_eval(_cfg(tiny_model_dir, tmp_path / "ev", f"exclude=[{train}]"))
    assert not (tmp_path / "ev").exists()  # refused before anything was written


@pytest.mark.slow
def test_eval_bad_input_is_one_line(tiny_model_dir, tmp_path):
    proc = run_cli("eval", "--set", "models=[{name: no-such-model-xyz}]")
    assert_one_line_error(proc, "no-such-model-xyz")
    proc = run_cli("eval", "--set", "tasks=[{source: 'rg:basic_arithmetic?size=0&seed=1'}]",
                   "--set", f"models=[{{name: '{tiny_model_dir}'}}]")  # fmt: skip
    assert_one_line_error(proc, "no records found")
    proc = run_cli("eval", "--set", "ks=[4]")
    assert_one_line_error(proc, "ks: 4 needs at least that many samples")


def test_memory_meter_measures_what_the_block_holds_despite_earlier_garbage():
    import torch

    from potstill.eval.cost import MemoryMeter

    junk = [torch.ones(1_000_000) for _ in range(100)]  # 400 MB in 4 MB pieces, then freed
    del junk
    with MemoryMeter() as meter:
        held = [torch.ones(1_000_000) for _ in range(50)]  # 200 MB
    assert 0.9 * 200e6 < meter.peak_bytes < 1.3 * 200e6, meter.peak_bytes
    del held
