"""RLT training: GRPO's advantages and loss against closed forms, and `potstill rlt train` /
`rlt warmup` / `rlt explain` through the real CLI on tiny models (train: changes the weights and
resumes exactly)."""

import json
import shutil

import pytest
import torch

from potstill.data import write_records
from potstill.rlt.grpo import ADVANTAGE_EPS, group_advantages, grpo_loss
from potstill.train.loop import read_metrics

from .conftest import assert_one_line_error, run_cli

QUESTIONS = [
    {"id": f"q{i}", "question": f"What is {i} + 25?", "solution": f"{i} + 25 = {i + 25}"}
    for i in range(4)
]
# About a third of the tiny random model's 6-token samples hold a "t", so with "t" as the closing
# tag some explanations close and some do not: a group's rewards differ, GRPO has a signal.
TINY_TAGS = ("--set", "tags.explanation_end=t")
NO_SYSTEM = ("--set", "teacher_system_prompt=null", "--set", "student_system_prompt=null")


def test_group_advantages_closed_form():
    adv = group_advantages([1.0, 2.0, 3.0])
    assert adv == pytest.approx([-1 / (1 + ADVANTAGE_EPS), 0.0, 1 / (1 + ADVANTAGE_EPS)])
    assert group_advantages([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]  # no signal, no push
    # a skipped sample (no reward) gets 0 and is left out of the mean and std
    adv = group_advantages([1.0, None, 3.0])
    std = 2**0.5  # sample std of (1, 3)
    assert adv == pytest.approx([-1 / (std + ADVANTAGE_EPS), 0.0, 1 / (std + ADVANTAGE_EPS)])


def test_grpo_loss_value_and_gradient_match_the_direct_formula():
    gen = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(3, 5, generator=gen) * 3).requires_grad_()
    ref = -torch.rand(3, 5, generator=gen) * 3
    adv = torch.tensor([1.5, -0.5, 0.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    beta, window = 0.1, 20
    loss, parts = grpo_loss(logprobs, ref, adv, mask, beta, window)
    expected, grad = 0.0, torch.zeros(3, 5)
    for b in range(3):
        for k in range(5):
            if mask[b, k]:
                d = float(ref[b, k] - logprobs[b, k].detach())
                expected += -adv[b].item() + beta * (torch.exp(torch.tensor(d)).item() - d - 1)
                grad[b, k] = -adv[b].item() + beta * (1 - torch.exp(torch.tensor(d)).item())
    assert loss.item() == pytest.approx(expected / window, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, grad / window)
    assert parts["pg_loss"] == pytest.approx(-(1.5 * 3 - 0.5 * 5) / window, rel=1e-6)
    no_kl, parts = grpo_loss(logprobs, None, adv, mask, 0.0, window)
    assert "kl" not in parts and no_kl.item() == pytest.approx(parts["pg_loss"])


def _train(model_dir, data, out, *extra):
    return run_cli(
        "rlt", "train",
        "--set", f"teacher.name={model_dir}", "--set", f"student.name={model_dir}",
        "--set", f"data.source={data}", "--set", "grpo.group_size=4",
        "--set", "grpo.max_new_tokens=6", "--set", "grpo.temperature=1.0",
        "--set", "train.max_steps=3", "--set", "train.save_every=1",
        "--set", "train.keep_checkpoints=3", "--set", "train.micro_batch_size=2",
        "--set", "train.lr=5e-3", "--set", "run.log_with=[]", "--set", f"run.output_dir={out}",
        *TINY_TAGS, *NO_SYSTEM, *extra,
    )  # fmt: skip


@pytest.mark.slow
def test_rlt_train_changes_the_teacher_and_resumes_exactly(tiny_model_dir, tmp_path):
    data = write_records(tmp_path / "q.jsonl", QUESTIONS)
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = _train(tiny_model_dir, data, full)
    assert proc.returncode == 0, proc.stderr
    metrics = read_metrics(full / "metrics.jsonl")
    assert sorted(metrics) == [1, 2, 3]
    for m in metrics.values():
        assert {"reward_mean", "closed", "flat_groups", "kl", "pg_loss"} <= set(m)
        assert 0 < m["closed"] < 1  # a mix of closed and unclosed explanations
    assert any(m["grad_norm"] > 0 for m in metrics.values())

    from safetensors.torch import load_file

    adapter = load_file(full / "final" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b)  # B starts at 0: it moved

    # Killed after the step-2 checkpoint: a rerun redoes step 3 with the same samples and loss.
    assert _train(tiny_model_dir, data, cut).returncode == 0
    shutil.rmtree(cut / "checkpoints" / "step-000003")
    shutil.rmtree(cut / "final")
    proc = _train(tiny_model_dir, data, cut, "--resume")
    assert proc.returncode == 0, proc.stderr
    resumed = read_metrics(cut / "metrics.jsonl")[3]
    for key in ("loss", "reward_mean", "kl", "completion_tokens"):
        assert resumed[key] == pytest.approx(metrics[3][key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_full_fine_tuning_with_reference_resync(tiny_model_dir, tmp_path):
    """No LoRA: every weight trains, and the reference is a copy of every weight, re-synced
    every 2 steps, saved, and named in the checkpoint so a resume reloads it."""
    from safetensors.torch import load_file

    data = write_records(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "sync"
    sets = ("--set", "grpo.ref_sync_every=2", "--set", "teacher.lora=null")
    proc = _train(tiny_model_dir, data, out, *sets)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "reference").iterdir()) == ["step-00000002.safetensors"]
    state = json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["extra"] == {"ref_step": 2}
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    reference = load_file(out / "reference" / "step-00000002.safetensors")
    assert len(reference) == len(before)  # every weight is in the reference
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_group_size_one_is_a_config_error(tiny_model_dir, tmp_path):
    data = write_records(tmp_path / "q.jsonl", QUESTIONS)
    proc = _train(tiny_model_dir, data, tmp_path / "g1", "--set", "grpo.group_size=1")
    assert_one_line_error(proc, "group_size", ">= 2")
    assert not (tmp_path / "g1").exists()


def test_missing_solution_names_the_record(tiny_model_dir, tmp_path):
    rows = [*QUESTIONS[:2], {"id": "bad", "question": "What is 1 + 1?"}]
    data = write_records(tmp_path / "q.jsonl", rows)
    proc = _train(tiny_model_dir, data, tmp_path / "out")
    assert_one_line_error(proc, "'bad'", "'solution'")


def test_vocab_mismatch_is_refused(tiny_model_dir, other_vocab_dir, tmp_path):
    data = write_records(tmp_path / "q.jsonl", QUESTIONS)
    proc = _train(
        tiny_model_dir, data, tmp_path / "out", "--set", f"student.name={other_vocab_dir}"
    )
    assert_one_line_error(proc, "vocabular")


@pytest.mark.slow
def test_warmup_learns_the_explanation_only(tiny_model_dir, tmp_path):
    from potstill.losses.reduce import IGNORE_INDEX
    from potstill.models import load_tokenizer
    from potstill.stages.rlt_warmup import RLTWarmupConfig, warmup_examples

    tok = load_tokenizer(tiny_model_dir)
    rows = [{**QUESTIONS[0], "explanation": "Add 0 and 25."}]
    cfg = RLTWarmupConfig(teacher_system_prompt=None)
    [example], skipped = warmup_examples(rows, tok, cfg)
    target = [
        t
        for t, label in zip(example.input_ids, example.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    assert skipped == 0
    assert tok.decode(target) == "Add 0 and 25." + cfg.tags.explanation_end + tok.eos_token
    prompt = tok.decode(example.input_ids[: len(example.input_ids) - len(target)])
    assert prompt.endswith(cfg.tags.explanation_start + "\n\n")
    assert QUESTIONS[0]["solution"] in prompt  # the teacher sees the solution

    data = write_records(tmp_path / "w.jsonl", [{**q, "explanation": "Add."} for q in QUESTIONS])
    proc = run_cli(
        "rlt", "warmup", "--set", f"teacher.name={tiny_model_dir}", "--set", f"data.source={data}",
        "--set", "train.max_steps=2", "--set", "run.log_with=[]",
        "--set", f"run.output_dir={tmp_path / 'warm'}", "--set", "teacher_system_prompt=null",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "warm" / "final" / "adapter_config.json").is_file()


def _explain(model_dir, data, out, *extra):
    return run_cli(
        "rlt", "explain",
        "--set", f"teacher.name={model_dir}", "--set", f"student.name={model_dir}",
        "--set", f"data.source={data}", "--set", "sampling.num_explanations=3",
        "--set", "sampling.max_new_tokens=8", "--set", "sampling.temperature=1.0",
        "--set", f"run.output_dir={out}", *TINY_TAGS, *NO_SYSTEM, *extra,
    )  # fmt: skip


@pytest.mark.slow
def test_explain_select_best_keeps_the_top_reward_per_question(tiny_model_dir, tmp_path):
    from potstill.data import read_shards

    data = write_records(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "explain"
    proc = _explain(tiny_model_dir, data, out, "--select", "best")
    assert proc.returncode == 0, proc.stderr
    every = list(read_shards(out / "explanations"))
    assert sorted(r["id"] for r in every) == sorted(f"q{i}#{n}" for i in range(4) for n in range(3))
    kept = [json.loads(line) for line in (out / "explained.jsonl").read_text().splitlines()]
    assert len({r["source_id"] for r in kept}) == len(kept)  # one per question at most
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["explanations"] == 12
    for r in kept:
        assert r["explanation_closed"]
        assert r["completion"].startswith("<|begin_of_thought|>" + r["explanation"])
        assert r["completion"].endswith(r["solution"] + "<|end_of_solution|>")
    scored = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 12
    for r in kept:
        rivals = [x["rlt_reward"] for x in scored
                  if x["source_id"] == r["source_id"] and x["explanation_closed"]]  # fmt: skip
        assert r["rlt_reward"] == max(rivals)
    # rerun: nothing left to generate, same output
    before = (out / "explained.jsonl").read_text()
    proc = _explain(tiny_model_dir, data, out, "--select", "best")
    assert proc.returncode == 0, proc.stderr
    assert (out / "explained.jsonl").read_text() == before
