"""`potstill doctor … --config`: each part of the plan in closed form, the verdict and what would
fit, a bad config refused in one line, and the predicted peak against the measured peak of real
2-step runs (sft LoRA, distill online) of small random models, each in a fresh subprocess."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from potstill.memory_plan import (
    FLOAT32,
    Settings,
    lora_parameters,
    make_plan,
    model_shape,
    plan_memory,
)

from .conftest import assert_one_line_error, build_tokenizer, run_cli

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def qwen_config(hidden=64, layers=2, vocab=320):
    return Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip


def settings(**changes) -> Settings:
    base = dict(stage="sft", micro_batch_size=2, max_seq_len=64, grad_accum=1,
                gradient_checkpointing=False, weight_bytes=4, lora_rank=4)  # fmt: skip
    return Settings(**{**base, **changes})


def test_lora_count_equals_peft_and_adamw_is_two_moments():
    from potstill.config.sections import LoraConfig
    from potstill.models import apply_lora

    config = qwen_config()
    model = apply_lora(Qwen2ForCausalLM(config), LoraConfig(r=4, alpha=8))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape, s = model_shape(config), settings()
    assert lora_parameters(shape, s) == real
    memory = plan_memory(shape, None, s)
    assert memory.optimizer == 2 * real * FLOAT32 and memory.gradients == real * FLOAT32
    assert memory.weights == shape.parameters * 4 + real * FLOAT32
    full = plan_memory(shape, None, settings(lora_rank=None))
    assert full.optimizer == 2 * shape.parameters * 4 and full.trainable == shape.parameters


def test_activations_scale_with_tokens_and_checkpointing_keeps_layer_inputs():
    shape = model_shape(qwen_config(layers=4))
    one, two = (plan_memory(shape, None, settings(micro_batch_size=b)) for b in (1, 2))
    assert two.activations == 2 * one.activations
    ckpt = plan_memory(shape, None, settings(gradient_checkpointing=True))
    per_layer = two.activations_without_checkpointing // 4
    assert ckpt.activations == 4 * shape.hidden * 128 * 4 + per_layer
    assert ckpt.activations < two.activations


def test_teacher_online_counts_its_weights_offline_none():
    student, teacher = model_shape(qwen_config()), model_shape(qwen_config(hidden=96))
    online = plan_memory(student, teacher, settings(stage="distill", teacher_mode="online"))
    offline = plan_memory(student, teacher, settings(stage="distill", teacher_mode="offline"))
    assert online.teacher == teacher.parameters * 2 + 128 * teacher.hidden * 2
    assert offline.teacher == 0


def test_a_teacher_stored_in_bf16_counts_the_bytes_narrow_storage_keeps():
    from potstill.train.frozen_storage import narrow_storage

    config = qwen_config(hidden=96)
    model = Qwen2ForCausalLM(config).eval()
    teacher = model_shape(config)
    assert teacher.parameters == sum(p.numel() for p in model.parameters())
    narrow_storage(model, torch.bfloat16, torch.float32)
    s = settings(stage="distill", teacher_mode="online", teacher_bytes=4)
    narrow = replace(s, teacher_storage_bytes=2)
    weights = sum(p.nbytes for p in model.parameters())  # linear weights 2 bytes, the rest 4
    assert plan_memory(teacher, teacher, narrow).teacher == weights + 128 * teacher.hidden * 4
    assert plan_memory(teacher, teacher, s).teacher == teacher.parameters * 4 + 128 * 96 * 4
    room = plan_memory(teacher, teacher, narrow).peak  # fits stored narrow, not wide
    plan = make_plan(teacher, teacher, s, available=room, available_source="test",
                     throughput=1e9, throughput_source="test")  # fmt: skip
    assert "teacher.storage_dtype=bfloat16" in plan.suggestions


def test_a_plan_that_cannot_fit_says_what_would():
    shape = model_shape(qwen_config(hidden=256, layers=4))
    s = settings(micro_batch_size=16, max_seq_len=512, lora_rank=None)
    need = plan_memory(shape, None, s).peak
    plan = make_plan(shape, None, s, available=int(need * 0.6), available_source="test",
                     throughput=1e9, throughput_source="test")  # fmt: skip
    assert plan.verdict.startswith("does not fit")
    assert plan.suggestions and all("=" in text for text in plan.suggestions)
    roomy = make_plan(shape, None, s, available=2 * need, available_source="test",
                      throughput=1e9, throughput_source="test")  # fmt: skip
    assert roomy.verdict.startswith("fits") and roomy.suggestions == []
    assert roomy.seconds_per_step == pytest.approx(6 * shape.parameters * 16 * 512 / 1e9)


def test_cli_prints_the_plan_and_a_bad_config_is_one_line(tiny_model_dir, tmp_path):
    good = tmp_path / "sft.yaml"
    good.write_text(f"model: {{name: {tiny_model_dir}}}\ntrain: {{micro_batch_size: 2}}\n")
    proc = run_cli("doctor", str(tiny_model_dir), str(tiny_model_dir), "--config", str(good),
                   "--memory-gb", "0.0001", "--gflops", "10")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "plan (sft" in proc.stdout and "plan verdict: does not fit" in proc.stdout
    assert "would fit:" in proc.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {limit: 3}\n")
    proc = run_cli("doctor", str(tiny_model_dir), str(tiny_model_dir), "--config", str(bad))
    assert_one_line_error(proc, "--stage")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train: {micro_batch_size: 0}\nmodel: {name: x}\n")
    proc = run_cli("doctor", str(tiny_model_dir), str(tiny_model_dir), "--config", str(wrong))
    assert_one_line_error(proc, "micro_batch_size")


def test_bf16_note_only_when_this_cpu_multiplies_bf16_much_faster(tiny_model_dir, tmp_path):
    from potstill.cli.doctor_plan import BF16_WORTH, bf16_note
    from potstill.memory_plan import measure_throughput

    shape = model_shape(qwen_config())
    bf16 = measure_throughput(dtype="bfloat16")

    def plan_at(throughput):
        return make_plan(shape, None, settings(), available=1 << 40, available_source="test",
                         throughput=throughput, throughput_source="test")  # fmt: skip

    # The probe moves with the machine's load (10x on a busy one): a million-fold apart is not.
    assert bf16_note(plan_at(bf16 * 1e6)) == []  # float32 far faster than bf16: no note
    slow = plan_at(bf16 / 1e6)  # float32 a millionth of bf16's rate: the note
    (note,) = bf16_note(slow)
    ratio = float(note.split("bfloat16 ")[1].split("×")[0])
    assert ratio > 1e4 * BF16_WORTH, note
    step = float(note.split("take ~")[1].split(" s")[0])
    assert step == pytest.approx(slow.seconds_per_step / ratio, rel=0.06)
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}, dtype: bfloat16}}\n")
    proc = run_cli("doctor", str(tiny_model_dir), str(tiny_model_dir), "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "512×512 bfloat16 matmul probe" in proc.stdout and "note: this CPU" not in proc.stdout


def small_model(path: Path, hidden: int, seed: int, vocab: int = 320) -> Path:
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    Qwen2ForCausalLM(qwen_config(hidden=hidden, layers=4, vocab=vocab)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("allocator", ["glibc default", "freed memory returned"])
@pytest.mark.parametrize("stage", ["sft", "distill"])
def test_predicted_peak_within_15_percent_of_a_real_run(tmp_path, monkeypatch, stage, allocator):
    """Both ways glibc may run the trainer: by default it keeps freed activation pages (the
    plan's allocator line), with RETURN_FREED_ENV it gives them back (the line is 0)."""
    sys.path.insert(0, str(BENCH))
    import doctor_plan as bench

    from potstill.memory_plan import RETURN_FREED_ENV

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    if allocator != "glibc default":
        for pair in RETURN_FREED_ENV.split():
            monkeypatch.setenv(*pair.split("="))

    student = small_model(tmp_path / "student", 512, 0)
    teacher = small_model(tmp_path / "teacher", 768, 1)
    data = bench.long_records(tmp_path / "records.jsonl", 8, 80)
    lora = {"r": 8, "alpha": 16, "dropout": 0.0}
    common = {"data": {"source": str(data), "system_prompt": None},
              "train": bench.train_section(2, 256, 8),
              "run": {"output_dir": str(tmp_path / "run"), "log_with": []}}  # fmt: skip
    if stage == "sft":
        cfg = {"model": {"name": str(student), "lora": lora}, **common}
    else:
        cfg = {"student": {"name": str(student), "lora": lora},
               "teacher": {"model": {"name": str(teacher)}}, **common}  # fmt: skip
    path = bench.write_yaml(tmp_path / "config.yaml", cfg)
    plan, _ = bench.predict(stage, path, str(teacher), str(student), 1e10)
    assert (plan.memory.allocator > 0) == (allocator == "glibc default")
    measured = bench.measure(stage, path, timeout=600)  # inherits the environment set above
    error = (plan.memory.peak - measured["peak_bytes"]) / measured["peak_bytes"]
    assert abs(error) <= 0.15, json.dumps({"plan": plan.to_dict(), "measured": measured})


@pytest.mark.slow
def test_cross_tokenizer_plan_counts_both_vocabularies_chunk(tmp_path, monkeypatch):
    """Across tokenizers the loss chunk holds rows of both vocabularies: at 32,768 and 49,152
    entries (ids past the small tokenizer's are never targets, but are in every softmax and
    sort) it is most of the peak, and the plan's `CROSS_ROW_BUFFERS` must account for it. One
    tokenizer on both sides, so every target is paired: the plan's worst case is the case."""
    sys.path.insert(0, str(BENCH))
    import doctor_plan as bench

    from potstill.memory_plan import CROSS_ROW_BUFFERS, RETURN_FREED_ENV

    for pair in RETURN_FREED_ENV.split():
        monkeypatch.setenv(*pair.split("="))
    student = small_model(tmp_path / "student", 256, 0, vocab=32_768)
    teacher = small_model(tmp_path / "teacher", 384, 1, vocab=49_152)
    data = bench.long_records(tmp_path / "records.jsonl", 4, 80)
    cfg = {"student": {"name": str(student), "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
           "teacher": {"model": {"name": str(teacher)}},
           "loss": {"cross_tokenizer": {"loss": "hybrid"}},
           "data": {"source": str(data), "system_prompt": None},
           "train": bench.train_section(2, 160, 4),
           "run": {"output_dir": str(tmp_path / "run"), "log_with": []}}  # fmt: skip
    path = bench.write_yaml(tmp_path / "config.yaml", cfg)
    plan, settings = bench.predict("distill", path, str(teacher), str(student), 1e10)
    assert settings.cross_tokenizer
    # 4 × 159 target rows, chunks of cross_chunk_rows(32,768, 49,152) = 512 (and 124)
    assert plan.memory.loss_chunks == 512 * (32_768 + 49_152) * 4 * CROSS_ROW_BUFFERS
    measured = bench.measure("distill", path, timeout=600)
    error = (plan.memory.peak - measured["peak_bytes"]) / measured["peak_bytes"]
    assert abs(error) <= 0.15, json.dumps({"plan": plan.to_dict(), "measured": measured})
