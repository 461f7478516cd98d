"""`potstill rlt warmup`: supervised warm-up of the teacher in its own format.

    potstill rlt warmup --config configs/rlt_warmup-cpu.yaml

Each record's question goes in the user turn (with the teacher's system prompt), the assistant
turn starts with the solution and the opened explanation section (the same prefill `rlt train`
and `rlt explain` use), and the loss is on the explanation and its closing tag only. The
model learns the format (and to close the section) before GRPO rewards what it writes. This is
`potstill sft`'s loop, examples and loss; only the example builder differs.
"""

from __future__ import annotations

from rich.console import Console

from potstill.errors import DataError
from potstill.rlt.config import RLTWarmupConfig
from potstill.rlt.data import load_rlt_records
from potstill.rlt.prompts import system_prompt, teacher_request
from potstill.train.sft import build_example, fit_examples


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
    result, final = fit_examples(
        model, tokenizer, examples, config=cfg, model_cfg=cfg.teacher, train_cfg=cfg.train,
        run_cfg=cfg.run, command="rlt warmup", inputs=[cfg.data.source], counts=counts,
        console=console, resume=resume,
    )  # fmt: skip
    console.print(f"[green]done[/] {result['step']} steps; teacher saved to {final}")
    return result
