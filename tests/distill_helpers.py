"""Shared pieces of the distill tests: tiny teacher/student pair, records, a teacher cache."""

from __future__ import annotations

import torch

from potstill.config import load_config
from potstill.data import write_records
from potstill.stages.distill import DistillConfig

from .conftest import build_model, build_tokenizer


def make_teacher_dir(path):
    """A tiny teacher: same tokenizer as `tiny_model_dir`, wider, other weights."""
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=1, hidden=48).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_data(path, n=12):
    rows = [
        {"id": f"r{i}", "question": f"What is {i} + {i}?", "completion": f"Answer: {2 * i}"}
        for i in range(n)
    ]
    return write_records(path, rows)


def config(student, teacher, data, out, *overrides, mode="online", cache=None) -> DistillConfig:
    return load_config(
        DistillConfig,
        overrides=distill_overrides(
            student, teacher, data, out, *overrides, mode=mode, cache=cache
        ),
    )


def distill_overrides(student, teacher, data, out, *overrides, mode="online", cache=None):
    """The `key=value` overrides of `config` (for the CLI: one `--set` each)."""
    base = [
        f"student.name={student}",
        "student.lora={r: 4, alpha: 8, dropout: 0.0}",
        f"teacher.model.name={teacher}",
        f"teacher.mode={mode}",
        f"data.source={data}",
        "data.system_prompt=null",
        "train.max_steps=5",
        "train.save_every=2",
        "train.micro_batch_size=2",
        "train.grad_accum=2",
        "train.lr=0.01",
        "train.warmup_ratio=0.0",
        "teacher.on_policy.max_new_tokens=6",
        "run.log_with=[]",
        f"run.output_dir={out}",
    ]
    if cache is not None:
        base.append(f"teacher.cache={cache}")
    return [*base, *overrides]


def cli_args(student, teacher, data, out, *extra):
    return [
        "distill",
        "--set", f"student.name={student}",
        "--set", "student.lora={r: 4, alpha: 8, dropout: 0.0}",
        "--set", f"teacher.model.name={teacher}",
        "--set", f"data.source={data}",
        "--set", "data.system_prompt=null",
        "--set", "train.max_steps=2",
        "--set", "train.micro_batch_size=2",
        "--set", "run.log_with=[]",
        "--set", f"run.output_dir={out}",
        *extra,
    ]  # fmt: skip


def teacher_rows(teacher_dir, cfg: DistillConfig, k: int):
    """record id -> (ids, log_probs) (T, k): the teacher's top k at each predicted target token."""
    from potstill.models import load_model, load_tokenizer
    from potstill.stages.distill import load_items

    tokenizer = load_tokenizer(teacher_dir)
    model = load_model(teacher_dir, device="cpu")
    items, _ = load_items(cfg, tokenizer)
    rows = {}
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([item.example.input_ids])
            log_p = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            mask = torch.tensor(item.example.labels[1:]) != -100
            top = log_p[mask].topk(k, dim=-1)
            rows[item.record_id] = (top.indices, top.values)
    return rows, tokenizer, model.config.vocab_size


def write_cache(path, teacher_dir, cfg: DistillConfig, *, k: int, corrupt: str | None = None):
    """A cache as `potstill teacher cache` would write it (lossless f32 log-probs). `corrupt`
    names a record whose log-probs get a NaN, written past the writer's own check."""
    from potstill.teacher.cache import CacheWriter, tokenizer_fingerprint

    rows, tokenizer, vocab = teacher_rows(teacher_dir, cfg, k)
    meta = {
        "teacher": str(teacher_dir),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab,
        "k": k,
        "encoding": "u32-f32",
        "temperature": 1.0,
    }
    with CacheWriter(path, meta) as writer:
        for record_id, (ids, log_probs) in rows.items():
            if record_id == corrupt:
                log_probs = log_probs.clone()
                log_probs[0, 0] = float("nan")
                _append_unchecked(writer, record_id, ids, log_probs)
            else:
                writer.write(record_id, ids, log_probs)
    return path


def _append_unchecked(writer, record_id, ids, log_probs):
    """Bypass CacheWriter.write's NaN check: what a buggy or older writer could leave behind."""
    tail = torch.full((ids.shape[0],), float("-inf"))
    data = writer.codec.encode(ids.numpy(), log_probs.numpy(), tail.numpy())
    writer.done_ids.add(record_id)
    writer._buffer.append((record_id, ids.shape[0], data))
