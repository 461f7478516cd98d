"""Distillation runs on tiny models: every teacher mode trains, offline with k = V equals online,
and a resumed run continues with the losses an uninterrupted one has."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from potstill.stages.distill import run_distill
from potstill.train.loop import read_metrics
from potstill.train.onpolicy import uses_student_sample

from .distill_helpers import config, make_teacher_dir, write_cache, write_data


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("distill")
    teacher = make_teacher_dir(root / "teacher")
    data = write_data(root / "data.jsonl")
    return tiny_model_dir, teacher, data, root


def _run(cfg, **kw):
    from rich.console import Console

    return run_distill(cfg, Console(quiet=True), **kw)


def _losses(out, key="loss"):
    return {step: m[key] for step, m in read_metrics(out / "metrics.jsonl").items()}


def _cache(pair, name, k):
    student, teacher, data, root = pair
    path = root / name
    if not path.exists():
        write_cache(path, teacher, config(student, teacher, data, root / "unused"), k=k)
    return path


@pytest.mark.parametrize("mode", ["online", "offline", "on_policy"])
def test_five_steps_change_the_parameters(pair, tmp_path, mode):
    student, teacher, data, _ = pair
    cache = _cache(pair, "cache-k8", 8) if mode == "offline" else None
    extra = ["teacher.on_policy.lmbda=1.0"] if mode == "on_policy" else []
    out = tmp_path / mode
    result = _run(config(student, teacher, data, out, *extra, mode=mode, cache=cache))
    assert result["step"] == 5
    metrics = read_metrics(out / "metrics.jsonl")
    assert sorted(metrics) == [1, 2, 3, 4, 5]
    for m in metrics.values():
        assert {"ce", "soft", "kd_ratio", "lr", "tokens_per_s", "grad_norm"} <= set(m)
        assert m["kd_ratio"] == pytest.approx(1.0 if mode == "on_policy" else 0.5)
    if mode == "on_policy":
        assert all(m["sampled_tokens"] > 0 for m in metrics.values())
    trained = load_file(out / "checkpoints" / "step-000005" / "trainable.safetensors")
    lora_b = [v for name, v in trained.items() if "lora_B" in name]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero
    assert (out / "final" / "adapter_config.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["sequences"] == 12 and manifest["counts"]["steps"] == 5


def test_soft_loss_goes_down_with_the_teacher_alone(pair, tmp_path):
    student, teacher, data, _ = pair
    out = tmp_path / "kd"
    cfg = config(student, teacher, data, out, "loss.kd_ratio.value=1.0", "train.max_steps=8")
    _run(cfg)
    soft = _losses(out, "soft")
    assert soft[8] < soft[1]
    alphas = [m["kd_ratio"] for m in read_metrics(out / "metrics.jsonl").values()]
    assert alphas == pytest.approx([1.0] * 8)


def test_offline_with_k_equal_to_vocab_equals_online(pair, tmp_path):
    student, teacher, data, _ = pair
    vocab = 320  # the tiny tokenizer's (and models') vocabulary
    cache = _cache(pair, "cache-full", vocab)
    steps = ["train.max_steps=3", "loss.kd_ratio.value=0.7"]
    _run(config(student, teacher, data, tmp_path / "on", *steps))
    _run(config(student, teacher, data, tmp_path / "off", *steps, mode="offline", cache=cache))
    online, offline = (
        read_metrics(tmp_path / "on" / "metrics.jsonl"),
        read_metrics(tmp_path / "off" / "metrics.jsonl"),
    )
    for step in (1, 2, 3):
        for key in ("loss", "ce", "soft", "grad_norm"):
            assert offline[step][key] == pytest.approx(online[step][key], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("online", ["loss.kd_ratio.strategy=balance", "loss.temperature=2.0"]),
        ("on_policy", ["teacher.on_policy.lmbda=0.5", "loss.divergence=jsd"]),
        ("offline", ["loss.kd_ratio.strategy=schedule"]),
    ],
)
def test_kill_then_resume_gives_the_losses_of_an_uninterrupted_run(pair, tmp_path, mode, extra):
    student, teacher, data, _ = pair
    cache = _cache(pair, "cache-k8", 8) if mode == "offline" else None
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = [*extra, "train.max_steps=4"]
    _run(config(student, teacher, data, full, *extra, mode=mode, cache=cache))
    # A run killed after its step-2 checkpoint: on disk is everything up to step 2 (and the
    # metrics of steps it logged after it, which the rerun overwrites).
    _run(config(student, teacher, data, cut, *extra, mode=mode, cache=cache))
    shutil.rmtree(cut / "checkpoints" / "step-000004")
    shutil.rmtree(cut / "final")
    _run(config(student, teacher, data, cut, *extra, mode=mode, cache=cache), resume=True)
    expected, resumed = read_metrics(full / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    for step in (3, 4):
        for key in ("loss", "soft", "kd_ratio"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-6)


def test_on_policy_coin_is_seeded_and_near_lambda():
    draws = [uses_student_sample(3, m, 0.3) for m in range(2000)]
    assert draws == [uses_student_sample(3, m, 0.3) for m in range(2000)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert not any(uses_student_sample(3, m, 0.0) for m in range(100))
    assert all(uses_student_sample(3, m, 1.0) for m in range(100))


def test_teacher_gets_no_gradients(pair):
    from potstill.data.examples import build_example
    from potstill.models import load_model
    from potstill.train.kd import Item, collate_items, load_teacher, make_loss_fn, online_teacher

    student_dir, teacher_dir, data, root = pair
    cfg = config(student_dir, teacher_dir, data, root / "unused")
    student = load_model(student_dir, device="cpu")
    # The teacher as `distill` loads it (the code under test freezes it, not this test).
    teacher = load_teacher(cfg, student.get_output_embeddings().weight.shape[0], "cpu")
    assert not teacher.training

    class Hooks:
        kd_ratio = 0.5

    from potstill.models import load_tokenizer

    tok = load_tokenizer(student_dir)
    messages = ({"role": "user", "content": "What is 1 + 1?"},)
    item = Item(build_example(tok, messages, "Answer: 2", 64), "x", messages)
    batch = collate_items([item], tok.pad_token_id)
    loss_fn = make_loss_fn(cfg, online_teacher(teacher), Hooks())
    loss, parts = loss_fn(student, batch, 4)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.lm_head.weight.grad is not None and torch.isfinite(loss)
    assert parts["kd_ratio"] * 4 == pytest.approx(item.example.target_tokens * 0.5)
