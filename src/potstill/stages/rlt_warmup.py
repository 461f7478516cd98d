"""`potstill rlt warmup`: supervised warm-up of the teacher in its own format.

    potstill rlt warmup --config configs/rlt_warmup-cpu.yaml

Each record's question goes in the user turn (with the teacher's system prompt), the assistant
turn starts with the solution and the opened explanation section (the same prefill `rlt train`
and `rlt explain` use), and the loss is on the explanation and its closing tag only. The
model learns the format (and to close the section) before GRPO rewards what it writes. This is
`potstill sft`'s loop, examples and loss; only the example builder differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console

from potstill.config.sections import LoraConfig, ModelConfig, RunConfig, TrainConfig
from potstill.data.examples import build_example
from potstill.errors import DataError
from potstill.rlt.config import KIT_05B, RLTDataConfig
from potstill.rlt.data import load_rlt_records
from potstill.rlt.prompts import RLTTags, system_prompt, teacher_request
from potstill.train.fit import Fit, fit_examples


@dataclass
class RLTWarmupConfig:
    """Supervised warm-up of the teacher on explanations in its own format (loss on the
    explanation and its closing tag only)."""

    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(name=KIT_05B, lora=LoraConfig())
    )
    data: RLTDataConfig = field(default_factory=RLTDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, grad_accum=4))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/rlt_warmup"))
    tags: RLTTags = field(default_factory=RLTTags)
    teacher_system_prompt: str | None = "rlt_teacher"
    """Bundled prompt name or .txt file (null = none)."""


def warmup_examples(records, tokenizer, cfg: RLTWarmupConfig):
    """(examples, records skipped because no explanation token fits in train.max_seq_len)."""
    system, data = system_prompt(cfg.teacher_system_prompt, cfg.tags), cfg.data
    examples, skipped = [], 0
    for record in records:
        request = teacher_request(
            str(record.get("id", "")), record[data.question_field], record[data.solution_field],
            tags=cfg.tags, system=system,
        )  # fmt: skip
        target = record[data.explanation_field] + cfg.tags.explanation_end
        example = build_example(
            tokenizer, request.messages, target, cfg.train.max_seq_len, prefill=request.prefill
        )
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    return examples, skipped


def run_warmup(cfg: RLTWarmupConfig, console: Console | None = None, *, resume: bool = False):
    from potstill.models import load_configured

    console = console or Console(stderr=True)
    records = load_rlt_records(cfg.data, explanation=True)
    model, tokenizer = load_configured(cfg.teacher)
    examples, skipped = warmup_examples(records, tokenizer, cfg)
    if not examples:
        raise DataError(
            f"{cfg.data.source}: no explanation token fits in train.max_seq_len="
            f"{cfg.train.max_seq_len}; raise it"
        )
    console.print(
        f"[bold]{len(examples)}[/] warm-up examples, "
        f"{sum(e.target_tokens for e in examples):,} explanation tokens ({skipped} skipped)"
    )
    counts = {"records": len(records), "examples": len(examples), "skipped": skipped}
    spec = Fit("rlt warmup", cfg, cfg.teacher, cfg.train, cfg.run, [cfg.data.source], counts)
    result, final = fit_examples(model, tokenizer, examples, spec, console=console, resume=resume)
    console.print(f"[green]done[/] {result['step']} steps; teacher saved to {final}")
    return result
