"""SFT: the prompt is masked, the loss is the mean over target tokens of the whole window, packing
keeps examples apart, and a resumed run continues with the losses an uninterrupted one has."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from potstill.data import write_records
from potstill.data.examples import build_example, collate, count_tokens, pack
from potstill.losses.reduce import IGNORE_INDEX
from potstill.train.fit import sft_loss
from potstill.train.loop import read_metrics

from .conftest import build_model, build_tokenizer, run_cli

USER = ({"role": "user", "content": "What is 17 + 25?"},)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return tokenizer, build_model(tokenizer)


def test_prompt_is_masked_and_target_ends_with_eos(tiny):
    tokenizer, _ = tiny
    ex = build_example(tokenizer, USER, "Answer: 42", max_len=512)
    prompt = tokenizer.apply_chat_template(list(USER), tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    target = tokenizer("Answer: 42", add_special_tokens=False)["input_ids"]
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == [*target, tokenizer.eos_token_id]
    assert ex.input_ids[n_prompt:] == ex.labels[n_prompt:]
    assert build_example(tokenizer, USER, "Answer: 42", max_len=n_prompt) is None  # no target left


def test_loss_is_mean_over_target_tokens_of_the_window(tiny):
    tokenizer, model = tiny
    exs = [build_example(tokenizer, USER, t, 512) for t in ("Answer: 42", "First add, then 5")]
    batch = collate(exs, tokenizer.pad_token_id)
    loss, _ = sft_loss(model, batch, count_tokens(batch))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    # one micro-batch of two == two micro-batches of one, normalised by the window's tokens
    window = count_tokens(batch)
    split = sum(sft_loss(model, collate([e], 0), window)[0] for e in exs)
    torch.testing.assert_close(split, loss, rtol=1e-5, atol=1e-6)


def test_packed_examples_do_not_attend_to_each_other(tiny):
    tokenizer, model = tiny
    exs = [build_example(tokenizer, USER, t, 512) for t in ("Answer: 42", "First add, then 5")]
    packed = pack(exs, max_len=512)
    assert len(packed) == 1 and packed[0].position_ids.count(0) == 2
    total = sum(e.target_tokens for e in exs)
    alone = sum(sft_loss(model, collate([e], 0), total)[0] for e in exs)
    together, _ = sft_loss(model, collate(packed, 0), total)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def _records(path, n=12):
    rows = [
        {"id": f"r{i}", "question": f"What is {i} + {i}?", "completion": f"Answer: {2 * i}"}
        for i in range(n)
    ]
    return write_records(path, rows)


def _sft_args(model_dir, data, out, *extra):
    return [
        "sft",
        "--set", f"model.name={model_dir}",
        "--set", "model.lora={r: 4, alpha: 8, dropout: 0.1}",
        "--set", f"data.source={data}",
        "--set", "data.system_prompt=null",
        "--set", "train.save_every=2",
        "--set", "train.micro_batch_size=2",
        "--set", "train.grad_accum=2",
        "--set", "train.lr=0.01",
        "--set", f"run.output_dir={out}",
        *extra,
    ]  # fmt: skip


def _sft(model_dir, data, out, *extra):
    return run_cli(*_sft_args(model_dir, data, out, "--set", "train.max_steps=4", *extra))


@pytest.mark.slow
def test_sft_trains_saves_and_resumes_exactly(tiny_model_dir, tmp_path):
    data = _records(tmp_path / "kept.jsonl")
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = _sft(tiny_model_dir, data, full)
    assert proc.returncode == 0, proc.stderr
    losses = {s: m["loss"] for s, m in read_metrics(full / "metrics.jsonl").items()}
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    assert (full / "final" / "adapter_config.json").is_file()
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["counts"]["sequences"] == 12

    # A run killed after its step-2 checkpoint: what is on disk is everything up to step 2.
    assert _sft(tiny_model_dir, data, cut).returncode == 0
    shutil.rmtree(cut / "checkpoints" / "step-000004")
    shutil.rmtree(cut / "final")
    proc = _sft(tiny_model_dir, data, cut, "--resume")
    assert proc.returncode == 0, proc.stderr
    resumed = read_metrics(cut / "metrics.jsonl")
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(losses[step], rel=1e-6)

    from potstill.models import load_model

    merged = load_model(full / "final", device="cpu")  # adapter dir: base + adapter, merged
    assert not hasattr(merged, "peft_config")


@pytest.mark.slow
def test_resume_with_changed_config_names_the_key(tiny_model_dir, tmp_path):
    data = _records(tmp_path / "kept.jsonl")
    out = tmp_path / "run"
    assert _sft(tiny_model_dir, data, out).returncode == 0
    proc = _sft(tiny_model_dir, data, out, "--set", "train.lr=0.5", "--resume")
    assert proc.returncode == 2
    assert "train.lr (0.01 before, 0.5 now)" in proc.stderr


def test_resume_without_checkpoint_is_refused(tiny_model_dir, tmp_path):
    data = _records(tmp_path / "kept.jsonl")
    proc = _sft(tiny_model_dir, data, tmp_path / "new", "--resume")
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_checkpoint_and_the_rerun_finishes(tiny_model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    data = _records(tmp_path / "kept.jsonl")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "potstill", *_sft_args(tiny_model_dir, data, out)]
    args += ["--set", "train.max_steps=400", "--set", "train.save_every=1000"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (
        not metrics.is_file() or not metrics.read_text().strip()
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    steps = max(read_metrics(metrics))
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved and int(saved[-1][5:]) == steps  # the last finished step, not step 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attempts"][-1]["status"] == "interrupted"


@pytest.mark.slow
def test_an_interrupt_mid_step_checkpoints_the_rng_of_the_last_finished_step(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Regression: the clean-stop checkpoint saved the RNG as the interrupted step had left it
    (its LoRA dropout had drawn from it), so the resumed run drew other dropout masks than an
    uninterrupted one and its losses differed from the step after the checkpoint on."""
    from rich.console import Console

    import potstill.stages.sft as sft
    import potstill.train.fit as fit
    from potstill.config import load_config
    from potstill.stages.sft import SFTConfig

    data = _records(tmp_path / "kept.jsonl")

    def run(out):
        args = _sft_args(tiny_model_dir, data, out, "--set", "train.max_steps=4")
        overrides = [value for flag, value in zip(args, args[1:], strict=False) if flag == "--set"]
        sft.run_sft(load_config(SFTConfig, overrides=overrides), Console(quiet=True))

    run(tmp_path / "full")
    real_loss, calls = fit.sft_loss, []

    def interrupted_loss(model, batch, window_tokens):
        calls.append(1)
        out = real_loss(model, batch, window_tokens)  # step 3's dropout masks are drawn here
        if len(calls) == 5:  # step 3's first micro-batch (grad_accum 2)
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(fit, "sft_loss", interrupted_loss)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(fit, "sft_loss", real_loss)
    saved = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert saved == ["step-000002"]
    run(tmp_path / "cut")
    expected = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    for step in (3, 4):
        assert resumed[step]["loss"] == expected[step]["loss"]  # exact: same masks, same weights
