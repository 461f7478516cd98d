"""`potstill quickstart`: every stage wired end to end on tiny models, resumable, one final table.

The full quickstart (real 1.5B teacher, 0.5B student) is the README's command, not a unit test."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from potstill.config import load_config
from potstill.data import read_records, write_records
from potstill.errors import ConfigError
from potstill.stages.quickstart import STAGES, QuickstartConfig, run_quickstart

REFUSE_ALL = "(?!)"
"""A regex that matches no answer at all."""


def _questions(path, prefix: str, n: int, first: int = 0):
    # A real regex verifier: even questions accept any answer, odd ones none. A random tiny
    # teacher then "solves" exactly the even ones, so every count below is known in advance
    # and would change if a stage skipped verification (or verified the wrong answer).
    records = [
        {
            "id": f"{prefix}-{i}",
            "question": f"What is {i} + {i}?",
            "answer": ".*" if i % 2 == 0 else REFUSE_ALL,
            "task": "regex",
        }
        for i in range(first, first + n)
    ]
    write_records(path, records)
    return str(path)


def _transfer_sets(tmp_path) -> str:
    near = _questions(tmp_path / "near.jsonl", "n", 2, first=30)
    far = _questions(tmp_path / "far.jsonl", "f", 5, first=21)
    return (
        f"[{{name: near, kind: rephrased, source: {near}}}, "
        f"{{name: far, kind: other_family, source: {far}}}]"
    )


def config(model_dir, tmp_path, **sets):
    overrides = {
        "teacher.name": str(model_dir),
        "student.name": str(model_dir),
        "student.lora": "{r: 4, alpha: 8}",
        "data.train": _questions(tmp_path / "train.jsonl", "t", 6),
        "data.eval": _questions(tmp_path / "eval.jsonl", "e", 4, first=4),
        "data.task_name": "sums",
        "data.transfer": _transfer_sets(tmp_path),
        "decoding.max_new_tokens": 12,
        "decoding.batch_size": 4,
        "decoding.stop": "[' ', 'e', 'a', 't', 'o']",
        "train.max_steps": 2,
        "train.micro_batch_size": 2,
        "train.grad_accum": 1,
        "run.output_dir": str(tmp_path / "qs"),
        **sets,
    }
    return load_config(QuickstartConfig, overrides=[f"{k}={v}" for k, v in overrides.items()])


def test_quickstart_runs_every_stage_and_resumes(tiny_model_dir, tmp_path):
    quiet = Console(file=open("/dev/null", "w"))
    cfg = config(tiny_model_dir, tmp_path)
    summary = run_quickstart(cfg, quiet)
    out = tmp_path / "qs"
    # Held-out ids differ, but "What is 4 + 4?" and "5 + 5" are held out: training drops them.
    assert [r["id"] for r in read_records(out / "data" / "train.jsonl")] == [
        f"t-{i}" for i in range(4)
    ]
    assert set(summary["rows"]) == {"teacher", "student (before)", "student (after)"}
    for row in summary["rows"].values():
        assert row["n"] == 4 and row["params"] > 0 and row["usd_per_1k_answers"] > 0
    funnel = json.loads((out / "curate" / "funnel.json").read_text())
    kept = funnel["steps"][-1]["records_out"]
    assert kept == summary["kept_traces"] == len(read_records(out / "curate" / "kept.jsonl")) > 0
    # Training keeps t-0..t-3; the teacher solves t-0 and t-2, every model e-4 and e-6.
    for row in summary["rows"].values():
        assert row["accuracy"] == pytest.approx(0.5), row
    kept_ids = sorted(r["id"].split("#")[0] for r in read_records(out / "curate" / "kept.jsonl"))
    assert set(kept_ids) <= {"t-0", "t-2"} and kept_ids  # never an odd (unsolvable) one
    assert summary["gain_points"] == 0.0
    # Transfer sets: the student before and after on each, apart from the trained task (near
    # accepts n-30 of n-30, n-31; far f-22 and f-24 of f-21..f-25), with the change's noise.
    assert [
        (t["set"], t["kind"], t["n"], t["before"], t["after"]) for t in summary["transfer"]
    ] == [
        ("near", "rephrased", 2, 0.5, 0.5),
        ("far", "other_family", 5, 0.4, 0.4),
    ]
    assert all(t["change_points"] == 0.0 and t["inside_noise"] for t in summary["transfer"])
    assert summary["transfer"][1]["stderr_points"] == pytest.approx(
        100 * (2 * 0.24 / 5) ** 0.5, abs=0.1
    )
    assert (out / "sft" / "final" / "adapter_config.json").is_file()
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(STAGES) <= set(manifest["timings"]) and manifest["counts"]["kept_traces"] == kept

    # A rerun finds every stage done: same summary, no stage redone (each gains an attempt).
    again = run_quickstart(config(tiny_model_dir, tmp_path), quiet)
    assert again["rows"] == summary["rows"]
    sft_manifest = json.loads((out / "sft" / "manifest.json").read_text())
    assert len(sft_manifest["attempts"]) == 2

    with pytest.raises(ConfigError, match=r"another config: decoding.max_new_tokens \(12 before"):
        run_quickstart(config(tiny_model_dir, tmp_path, **{"decoding.max_new_tokens": 5}), quiet)


def test_training_questions_held_out_in_a_transfer_set_are_dropped(tmp_path):
    from potstill.stages.quickstart import _write_split, transfer_path

    train = [{"id": f"t-{i}", "question": f"What is {i} + {i}?", "answer": "x"} for i in range(4)]
    held = [{"id": "e-0", "question": "what is 3 +  3?", "answer": "x"}]  # case and spaces differ
    transfer = {"in words": [{"id": "w-1", "question": "WHAT IS 1 + 1?", "answer": "x"}]}
    quiet = Console(file=open("/dev/null", "w"))
    train_path, eval_path = _write_split(tmp_path, train, held, transfer, quiet)
    assert [r["id"] for r in read_records(train_path)] == ["t-0", "t-2"]
    assert [r["id"] for r in read_records(transfer_path(tmp_path, "in words"))] == ["w-1"]
    assert transfer_path(tmp_path, "in words").name == "transfer-in-words.jsonl"


def test_a_transfer_set_named_like_the_task_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(
        ConfigError, match=r"^data.transfer: set names must differ .* 'sums' repeats$"
    ):
        config(tiny_model_dir, tmp_path, **{"data.transfer": "[{name: sums, source: x.jsonl}]"})
