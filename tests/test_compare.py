"""`potstill compare` on tiny models: one row per method × held-out set, the same budget for
every method, bad configs refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from potstill.config import load_config
from potstill.data import write_records
from potstill.errors import ConfigError
from potstill.stages.compare import CompareConfig, run_compare

from .conftest import assert_one_line_error, run_cli

REFUSE_ALL = "(?!)"


def _questions(path, prefix, first, n, accept_every=2):
    rows = [
        {"id": f"{prefix}-{i}", "question": f"What is {i} + {i}?", "task": "regex",
         "answer": ".*" if i % accept_every == 0 else REFUSE_ALL}
        for i in range(first, first + n)
    ]  # fmt: skip
    return str(write_records(path, rows))


def _overrides(model_dir, tmp_path, *extra):
    train = _questions(tmp_path / "train.jsonl", "t", 0, 6, accept_every=1)
    near = _questions(tmp_path / "near.jsonl", "n", 10, 4)
    far = _questions(tmp_path / "far.jsonl", "f", 20, 6, accept_every=3)
    return [
        f"teacher.name={model_dir}", f"student.name={model_dir}",
        "student.lora={r: 4, alpha: 8}", f"train={train}",
        f"held_out=[{{name: near, source: {near}}}, "
        f"{{name: far, source: {far}, kind: other_family}}]",
        "methods=[sft, logit]", "decoding.max_new_tokens=8", "decoding.batch_size=8",
        "decoding.stop=[' ', 'e', 'a', 't', 'o']",
        "decoding.system_prompt=arithmetic_steps", "budget.max_steps=1",
        "budget.micro_batch_size=2", "budget.grad_accum=1", "budget.max_seq_len=1024",
        "cache_k=8", "cost.latency_samples=0", "run.log_with=[]",
        f"run.output_dir={tmp_path / 'cmp'}", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_compare_trains_each_method_on_one_budget_and_fills_every_cell(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    # First sft alone; then logit is added to the same run: sft is not trained again.
    first = _overrides(tiny_model_dir, tmp_path, "methods=[sft]")
    alone = run_compare(load_config(CompareConfig, overrides=first), Console(quiet=True))
    assert [r["model"] for r in alone["rows"]] == ["teacher", "student (before)", "sft"]
    sft_final = (out / "methods" / "sft" / "final" / "adapter_model.safetensors").read_bytes()
    cfg = load_config(CompareConfig, overrides=_overrides(tiny_model_dir, tmp_path))
    table = run_compare(cfg, Console(quiet=True))
    sft_again = (out / "methods" / "sft" / "final" / "adapter_model.safetensors").read_bytes()
    assert sft_again == sft_final
    assert [r["model"] for r in table["rows"]] == ["teacher", "student (before)", "sft", "logit"]
    keys = ["near/with_prompt", "near/no_prompt", "far/with_prompt", "far/no_prompt"]
    for row in table["rows"]:
        assert sorted(row["cells"]) == sorted(keys), row["model"]
        # The teacher answers with the training prompt only (eval_teacher_without_system_prompt
        # is off by default: on a CPU its pass is the slowest of all).
        filled = [k for k in keys if row["model"] != "teacher" or k.endswith("/with_prompt")]
        assert [k for k in keys if row["cells"][k] is not None] == filled, row["model"]
    for row in table["rows"][2:]:
        assert row["failed"] is None
        assert row["training"]["steps"] == 1 and row["training"]["tokens"] > 0
    # The same budget: both methods trained on the same micro-batch of the same traces.
    sft, logit = (r["training"] for r in table["rows"][2:])
    assert sft["tokens"] == logit["tokens"]
    # Accuracies are real counts of a real verifier: near accepts 2 of 4, far 2 of 6, always.
    for row in table["rows"]:
        for k in keys:
            if row["cells"][k] is None:
                continue
            want = 0.5 if k.startswith("near") else 1 / 3
            assert row["cells"][k]["accuracy"] == pytest.approx(want), (row["model"], k)
    # Held-out NLL: every student scores the teacher's verified, untruncated held-out answers.
    from potstill.data.shards import read_shards

    verified = sum(
        1
        for name in ("near", "far")
        for r in read_shards(out / "eval" / "with_prompt" / "answers" / "teacher" / name)
        if r["verified"] and r["finish_reason"] != "length"
    )
    assert table["rows"][0]["nll"] is None  # the teacher is not scored against itself
    for row in table["rows"][1:]:
        pooled = row["nll"]["pooled"]
        assert pooled["answers"] == verified and pooled["nll"] > 0, row["model"]
    assert (out / "compare.md").read_text().startswith("| model | steps |")
    assert json.loads((out / "compare.json").read_text())["budget"]["max_steps"] == 1
    assert (out / "compare.html").read_text().count("<img src='data:image/png;base64,") == 1
    # A rerun finds every method trained: no step is redone, the table is the same.
    again = run_compare(cfg, Console(quiet=True))
    assert [r["cells"] for r in again["rows"]] == [r["cells"] for r in table["rows"]]
    attempts = json.loads((out / "methods" / "sft" / "manifest.json").read_text())["attempts"]
    assert len(attempts) == 3
    # A second seed grows the run: each method trains once more, seed 0's students stay.
    seeded = load_config(
        CompareConfig, overrides=[*_overrides(tiny_model_dir, tmp_path), "seeds=[0, 7]"]
    )
    grown = run_compare(seeded, Console(quiet=True))
    assert (
        out / "methods" / "sft" / "final" / "adapter_model.safetensors"
    ).read_bytes() == sft_final
    other = (out / "methods" / "sft-seed-7" / "final" / "adapter_model.safetensors").read_bytes()
    assert other != sft_final  # the seed reached LoRA's initialisation
    assert [r.get("seeds") for r in grown["rows"]] == [None, None, [0, 7], [0, 7]]
    cell = grown["rows"][2]["cells"]["near/with_prompt"]
    assert cell["per_seed"] == [0.5, 0.5] and cell["sd"] == 0.0
    assert cell["stderr"] == pytest.approx((0.5 * 0.5 / 4) ** 0.5)
    assert "trained with 2 seeds ([0, 7])" in grown["markdown"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["methods=[sft, distil]"], "methods[1]: 'distil' is not one of"),
        (["held_out=[]"], "held_out: empty; list at least one held-out set"),
        (["budget.max_steps=null"], "budget.max_steps: required"),
        (["seeds=[]"], "seeds: empty; give at least one training seed"),
        (["seeds=[3, 3]"], "seeds: each once, got [3, 3]"),
        (["seeds=[-1]"], "seed: must be in [0, 2**32), got -1"),
    ],
)
def test_bad_configs_are_refused(tiny_model_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        load_config(CompareConfig, overrides=_overrides(tiny_model_dir, tmp_path, *extra))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("methods", "refused"),
    [("[sft, on_policy, rlt]", "on_policy, rlt"), ("[sft, logit]", "logit")],
)
def test_a_pair_of_other_vocabularies_is_refused_for_the_methods_that_need_one(
    tiny_model_dir, other_vocab_dir, tmp_path, methods, refused
):
    sets = [f"--set={o}" for o in _overrides(tiny_model_dir, tmp_path)]
    sets += [f"--set=teacher.name={other_vocab_dir}", f"--set=methods={methods}"]
    proc = run_cli("compare", *sets)
    line = assert_one_line_error(proc, f"methods {refused} need one vocabulary: teacher and")
    assert ("loss.cross_tokenizer" in line) == (refused == "logit")
    assert not (tmp_path / "cmp").exists()


def test_cross_tokenizer_logit_and_sft_pass_the_vocabulary_check(other_vocab_dir, tiny_model_dir):
    from potstill.stages.compare import _check_vocab

    cfg = load_config(
        CompareConfig,
        overrides=[*_overrides(tiny_model_dir, Path(tiny_model_dir).parent / "x"),
                   f"teacher.name={other_vocab_dir}", "loss.cross_tokenizer={loss: uld}"],
    )  # fmt: skip
    _check_vocab(cfg)  # sft and logit across tokenizers: nothing to refuse


@pytest.mark.parametrize("overlap", ["id", "text"])
def test_a_held_out_set_overlapping_training_is_refused_in_one_line(
    tiny_model_dir, tmp_path, overlap
):
    clash = (
        {"id": "t-1", "question": "Something new?", "task": "regex", "answer": ".*"}
        if overlap == "id"
        else {"id": "x-1", "question": "What is 2 + 2?", "task": "regex", "answer": ".*"}
    )
    bad = write_records(tmp_path / "bad.jsonl", [clash])
    sets = [f"--set={o}" for o in _overrides(tiny_model_dir, tmp_path)]
    sets.append(f"--set=held_out=[{{name: bad, source: {bad}}}]")
    proc = run_cli("compare", *sets)
    what = "id 't-1'" if overlap == "id" else "the text of 'x-1'"
    assert_one_line_error(proc, f"held_out 'bad': shares {what} with the training questions")
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_a_compare_killed_inside_a_method_resumes_to_the_uninterrupted_table(
    tiny_model_dir, tmp_path
):
    import os
    import signal
    import subprocess
    import sys
    import time

    steps = ["budget.max_steps=4", "budget.save_every=1"]
    reference = load_config(CompareConfig, overrides=_overrides(tiny_model_dir, tmp_path, *steps))
    want = run_compare(reference, Console(quiet=True))
    killed = tmp_path / "killed"
    sets = [f"--set={o}" for o in _overrides(tiny_model_dir, tmp_path, *steps)]
    sets.append(f"--set=run.output_dir={killed}")
    cmd = [sys.executable, "-m", "potstill", "compare", *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    mid_logit = killed / "methods" / "logit" / "checkpoints" / "step-000002"
    try:
        deadline = time.monotonic() + 300
        while not mid_logit.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"compare ended before the kill: {proc.stderr.read()}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (killed / "compare.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    got = json.loads((killed / "compare.json").read_text())

    def counts(table):  # what the questions and weights decide (not the seconds or $)
        return [
            (r["model"], (r.get("training") or {}).get("tokens"),
             {k: c and (c["correct"], c["n"]) for k, c in r["cells"].items()}, r["nll"])
            for r in table["rows"]
        ]  # fmt: skip

    assert counts(got) == counts(want)
    for method in ("sft", "logit"):
        adapter = Path("methods") / method / "final" / "adapter_model.safetensors"
        same = (killed / adapter).read_bytes() == (tmp_path / "cmp" / adapter).read_bytes()
        assert same, f"{method}: the resumed student differs from the uninterrupted one"
