"""`potstill doctor TEACHER STUDENT --config FILE`: the config's memory and time plan.

Reads the config as `potstill sft/distill --config` read it (which one from its keys, or
`--stage`), the two config.json files, and what memory is free now; loads no weights.
"""

from __future__ import annotations

from pathlib import Path

from potstill.errors import ConfigError

STAGES = ("sft", "distill")
DISTILL_KEYS = {"student", "teacher", "loss"}


def detect_stage(path: Path, stage: str | None) -> str:
    """sft or distill: `stage` if given, else distill when the file has a student, teacher or
    loss section, sft when it has a model section."""
    from potstill.config import read_yaml

    if stage is not None:
        if stage not in STAGES:
            raise ConfigError(f"--stage: {stage!r} is not sft or distill")
        return stage
    keys = set(read_yaml(path))
    if keys & DISTILL_KEYS:
        return "distill"
    if "model" in keys:
        return "sft"
    raise ConfigError(
        f"{path}: neither an sft config (a model section) nor a distill one (student, teacher, "
        "loss); pass --stage sft or --stage distill"
    )


def available_memory(on_gpu: bool) -> tuple[int, str]:
    """Bytes free now, and where the figure comes from."""
    if on_gpu:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free, "free on the GPU (torch.cuda.mem_get_info)"
    import psutil

    return psutil.virtual_memory().available, "available RAM (psutil)"


def config_plan(teacher: str, student: str, path: Path, stage: str | None,
                memory_gb: float | None, gflops: float | None):  # fmt: skip
    """(Plan, its text lines) for the config at `path`."""
    import torch

    from potstill.cli.verbs import get_verb
    from potstill.config import load_config
    from potstill.memory_plan import (
        make_plan,
        measure_throughput,
        model_shape,
        settings_from_config,
    )
    from potstill.models import load_model_config, resolve_dtype

    key = detect_stage(path, stage)
    cfg = load_config(get_verb(key).config_class(), path)
    if memory_gb is not None and not memory_gb > 0:
        raise ConfigError(f"--memory-gb: must be > 0, got {memory_gb}")
    if gflops is not None and not gflops > 0:
        raise ConfigError(f"--gflops: must be > 0, got {gflops}")
    on_gpu = torch.cuda.is_available()
    settings = settings_from_config(cfg, key, on_gpu)
    shapes = [model_shape(load_model_config(spec)) for spec in (teacher, student)]
    if memory_gb is None:
        available, source = available_memory(on_gpu)
    else:
        available, source = int(memory_gb * (1 << 30)), "--memory-gb"
    model = cfg.model if key == "sft" else cfg.student
    dtype = resolve_dtype(model.dtype, "cpu")
    if gflops is None:
        probe = f"a 512×512 {str(dtype).removeprefix('torch.')} matmul probe on the CPU"
        throughput, how = measure_throughput(dtype=dtype), probe
    else:
        throughput, how = gflops * 1e9, "--gflops"
    plan = make_plan(
        shapes[1], shapes[0] if key == "distill" else None, settings, available=available,
        available_source=source, throughput=throughput, throughput_source=how,
    )  # fmt: skip
    notes = [] if on_gpu or gflops is not None or dtype != torch.float32 else bf16_note(plan)
    if model.name != student:
        notes.append(f"  note: the config's student is {model.name}; planned for {student}")
    return plan, plan_lines(plan, settings) + notes


BF16_WORTH = 1.5
"""bf16 matmuls this many times faster than float32 are worth a note."""


def bf16_note(plan) -> list[str]:
    """On a CPU with native bf16 math (avx512_bf16, AMX), dtype bfloat16 runs several times
    faster than the float32 that auto picks on a CPU; say so, with the step time it would take."""
    from potstill.memory_plan import measure_throughput

    ratio = measure_throughput(dtype="bfloat16") / plan.throughput
    if ratio < BF16_WORTH:
        return []
    return [
        f"  note: this CPU multiplies bfloat16 {ratio:.1f}× as fast as float32: dtype: bfloat16 "
        f"(model and teacher) would take ~{plan.seconds_per_step / ratio:.3g} s a step and half "
        "the weights' memory (LoRA adapters stay float32)"
    ]


def plan_lines(plan, s) -> list[str]:
    """The plan as text, one part a line, the verdict last."""
    from potstill.memory_plan import GIB, RETURN_FREED_ENV

    m = plan.memory
    loss = {"sft": "sft logits"}.get(s.stage, "fused-loss chunk")
    loss = "cross-tokenizer chunk (both vocabularies)" if s.cross_tokenizer else loss
    ckpt = "on" if s.gradient_checkpointing else "off"
    rows = [
        ("weights", m.weights, f"{s.weight_bytes} bytes a weight"
         + (f", LoRA r={s.lora_rank} in float32" if s.lora_rank else ", full fine-tuning")),
        ("gradients", m.gradients, f"{m.trainable:,} trained values"),
        ("AdamW state", m.optimizer, "two moments a trained value"),
        ("activations", m.activations, f"checkpointing {ckpt}; without "
         f"{m.activations_without_checkpointing / GIB:.3f} GiB, with "
         f"{m.activations_with_checkpointing / GIB:.3f} GiB"),
        ("loss chunks", m.loss_chunks, loss),
        ("teacher", m.teacher, s.teacher_mode or "none (sft)"),
        ("runtime", m.runtime, "libraries and thread pools (CPU)" if m.runtime else "none"),
        ("allocator", m.allocator, f"freed activations glibc keeps (CPU; {RETURN_FREED_ENV} "
         "returns them)" if m.allocator else "none"),
    ]  # fmt: skip
    lines = [f"plan ({s.stage}, {s.micro_batch_size} × {s.max_seq_len} tokens a micro-batch, "
             f"{s.grad_accum} a step):"]  # fmt: skip
    lines += [f"  {name:12} {value / GIB:8.3f} GiB  {note}" for name, value, note in rows]
    lines.append(f"  {'peak':12} {m.peak / GIB:8.3f} GiB")
    lines.append(
        f"  time: ~{plan.seconds_per_step:.2f} s an optimizer step ({plan.flops_per_step:.3g} "
        f"FLOPs at {plan.throughput / 1e9:.1f} GFLOP/s, {plan.throughput_source})"
    )
    lines.append(f"plan verdict: {plan.verdict} ({plan.available_source})")
    lines += [f"  would fit: {text}" for text in plan.suggestions]
    return lines
