"""`potstill rlt warmup`: supervised warm-up of the teacher in its own format.

    potstill rlt warmup --config configs/rlt_warmup-cpu.yaml

Each record's question goes in the user turn (with the teacher's system prompt), the assistant
turn starts with the solution and the opened explanation section (the same prefill `rlt train`
and `rlt explain` use), and the loss is on the explanation and its closing tag only. The
model learns the format (and to close the section) before GRPO rewards what it writes. This is
`potstill sft`'s loop, examples and loss; only the example builder differs.
"""

from __future__ import annotations

import torch
from rich.console import Console

from potstill.errors import DataError
from potstill.rlt.config import RLTWarmupConfig
from potstill.rlt.data import load_rlt_records
from potstill.rlt.prompts import system_prompt, teacher_request
from potstill.runs import RunDir
from potstill.train.sft import build_example, collate, count_tokens, sft_loss


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
    from potstill.models import apply_lora, load_configured
    from potstill.train.loop import train
    from potstill.train.save import save_final

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
    if cfg.teacher.lora:
        torch.manual_seed(cfg.train.seed)  # LoRA's initial weights
        model = apply_lora(model, cfg.teacher.lora)
    with RunDir(
        cfg.run.output_dir, command="rlt warmup", config=cfg, inputs=[cfg.data.source]
    ) as run:
        run.count(records=len(records), examples=len(examples), skipped=skipped)
        with run.timed("train"):
            result = train(
                cfg=cfg.train,
                model=model,
                examples=examples,
                collate=lambda batch: collate(batch, tokenizer.pad_token_id or 0),
                count_tokens=count_tokens,
                loss_fn=sft_loss,
                run=run,
                log_with=cfg.run.log_with,
                console=console,
                require_checkpoint=resume,
            )
        final = save_final(
            model, tokenizer, run.path / "final", merge=cfg.train.merge_lora,
            base_spec=cfg.teacher.name,
        )  # fmt: skip
        run.count(steps=result["step"], final_loss=result.get("loss", float("nan")))
    console.print(f"[green]done[/] {result['step']} steps; teacher saved to {final}")
    return result
