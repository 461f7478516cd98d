"""`potstill compare`'s rlt method on tiny models: the teacher explains each training answer,
the best explanation per question by RLT reward is kept, the student trains on it, and every
seed shares the one set of explanations."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from potstill.config import load_config
from potstill.data import read_records
from potstill.stages.compare import CompareConfig, run_compare

from .test_compare import _overrides

RLT = (
    "methods=[rlt]", "eval_without_system_prompt=false", "eval_teacher=false",
    # The tiny model closes an explanation whenever it writes a "t" (as in test_rlt_train).
    "rlt.tags.explanation_end=t", "rlt.sampling.num_explanations=3",
    "rlt.sampling.max_new_tokens=8", "rlt.sampling.temperature=1.0",
    # RLT's system prompts alone overflow the tiny model's 512 positions.
    "rlt.teacher_system_prompt=null", "rlt.student_system_prompt=null",
)  # fmt: skip


@pytest.mark.slow
def test_rlt_trains_each_seed_on_the_best_explanation_per_question(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    overrides = _overrides(tiny_model_dir, tmp_path, *RLT, "seeds=[0, 5]")
    table = run_compare(load_config(CompareConfig, overrides=overrides), Console(quiet=True))
    assert [(r["model"], r.get("seeds")) for r in table["rows"]] == [
        ("student (before)", None),
        ("rlt", [0, 5]),
    ]
    explain = out / "rlt-explain"
    manifest = json.loads((explain / "manifest.json").read_text())
    # 6 training questions × 3 explanations, written once: the second seed found them done.
    assert manifest["counts"]["explanations"] == 18
    assert len(manifest["attempts"]) == 2
    kept = read_records(explain / "explained.jsonl")
    scored = read_records(explain / "scored.jsonl")
    assert 0 < len(kept) <= 6 and len({r["source_id"] for r in kept}) == len(kept)
    for r in kept:
        assert r["solution"] == ".*"  # the training record's answer, shown to the teacher
        rivals = [s["rlt_reward"] for s in scored
                  if s["source_id"] == r["source_id"] and s["explanation_closed"]]  # fmt: skip
        assert r["rlt_reward"] == max(rivals)
    for method in ("rlt", "rlt-seed-5"):
        trained = json.loads((out / "methods" / method / "manifest.json").read_text())
        assert trained["inputs"][0]["spec"] == str(explain / "explained.jsonl")
        assert (out / "methods" / method / "final" / "adapter_model.safetensors").is_file()
    rlt_row = table["rows"][1]
    assert rlt_row["failed"] is None
    assert rlt_row["training"]["steps"] == 1 and rlt_row["training"]["tokens"] > 0
