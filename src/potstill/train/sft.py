"""`potstill sft`: fine-tune a student on records, with the loss on the target tokens only.

    potstill sft --config configs/sft.yaml [--resume]

The prompt (system prompt + question through the chat template) is masked; the target (the curated
trace, by default `completion`) is followed by the end-of-turn token so the student learns to
stop. Logits are computed only at target positions (`logits_to_keep`), so prompt tokens cost no
[T, V] logits. Packing puts several examples in one row with positions restarting at 0 for each:
transformers builds a block-diagonal causal mask from those positions, so examples never attend
to one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from potstill.data import read_records
from potstill.errors import ConfigError, DataError
from potstill.losses.reduce import IGNORE_INDEX
from potstill.prompts import load_prompt
from potstill.runs import RunDir
from potstill.sections import SFTConfig
from potstill.teacher.backends import Request
from potstill.teacher.hf_backend import render_prompt
from potstill.train.checkpoint import check_resumable


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    """IGNORE_INDEX on prompt tokens; the token itself on target tokens."""
    position_ids: list[int]

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def build_example(
    tokenizer, prompt_messages: tuple[dict, ...], target: str, max_len: int, *, prefill: str = ""
) -> Example | None:
    """Tokenise prompt and target apart (so the boundary is exact), truncate to `max_len`;
    None when no target token survives the truncation. `prefill` starts the assistant turn as
    part of the prompt (no loss on it)."""
    prompt = render_prompt(tokenizer, Request(key="", messages=prompt_messages, prefill=prefill))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = [*target_ids, tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(ids, labels, list(range(len(ids))))


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """First-fit-decreasing bins of up to `max_len` tokens; positions restart per example.
    Deterministic: the same examples give the same bins."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        slot = next((i for i, r in enumerate(room) if r >= len(ex.input_ids)), None)
        if slot is None:
            bins.append([ex])
            room.append(max_len - len(ex.input_ids))
        else:
            bins[slot].append(ex)
            room[slot] -= len(ex.input_ids)
    return [
        Example(
            [t for e in b for t in e.input_ids],
            [t for e in b for t in e.labels],
            [t for e in b for t in e.position_ids],
        )
        for b in bins
    ]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding is masked out and carries no label."""
    width = max(len(e.input_ids) for e in examples)

    def padded(rows, fill):
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows])

    return {
        "input_ids": padded([e.input_ids for e in examples], pad_id),
        "labels": padded([e.labels for e in examples], IGNORE_INDEX),
        "position_ids": padded([e.position_ids for e in examples], 0),
        "attention_mask": padded([[1] * len(e.input_ids) for e in examples], 0),
    }


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sft_loss(model, batch: dict[str, torch.Tensor], window_tokens: int):
    """Sum of next-token cross-entropy over target tokens / target tokens in the window."""
    labels = batch["labels"][:, 1:]
    predicts_target = (labels != IGNORE_INDEX).any(dim=0)  # columns some row needs logits for
    keep = predicts_target.nonzero().squeeze(-1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if inputs["attention_mask"].all() and inputs["input_ids"].shape[0] == 1:
        inputs.pop("attention_mask")  # packed rows: the mask comes from the position ids
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    targets = labels[:, keep]
    ce = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    loss = ce / window_tokens
    return loss, {"ce": loss.item()}


def record_examples(records: list[dict], data, tokenizer, max_len: int, *, where: str):
    """(record, prompt messages, Example or None) per record, built the way every trainer and
    the teacher cache build them: system prompt + the prompt field through the chat template,
    then the target field. None when no target token fits in `max_len`. `data` is a section with
    prompt_field, target_field and system_prompt (SFTDataConfig)."""
    system = load_prompt(data.system_prompt) if data.system_prompt else None
    for record in records:
        for field_name in (data.prompt_field, data.target_field):
            if not isinstance(record.get(field_name), str):
                which = "prompt" if field_name == data.prompt_field else "target"
                raise DataError(
                    f"{where}: record '{record['id']}' has no text field '{field_name}'; set "
                    f"data.{which}_field to a field the records have, or curate generated "
                    "samples first"
                )
        messages = ({"role": "user", "content": record[data.prompt_field]},)
        if system:
            messages = ({"role": "system", "content": system}, *messages)
        target = record[data.target_field]
        yield record, messages, build_example(tokenizer, messages, target, max_len)


def load_examples(cfg: SFTConfig, tokenizer) -> tuple[list[Example], dict[str, int]]:
    data = cfg.data
    records = read_records(data.source, limit=data.limit)
    built = record_examples(records, data, tokenizer, cfg.train.max_seq_len, where=data.source)
    examples = [ex for _, _, ex in built if ex is not None]
    skipped = len(records) - len(examples)
    if not examples:
        raise DataError(
            f"{data.source}: no record has a target token within train.max_seq_len="
            f"{cfg.train.max_seq_len}; raise it"
        )
    counts = {"records": len(records), "skipped_no_target_tokens": skipped}
    if cfg.train.packing:
        examples = pack(examples, cfg.train.max_seq_len)
    counts["sequences"] = len(examples)
    counts["target_tokens"] = sum(e.target_tokens for e in examples)
    return examples, counts


def run_sft(cfg: SFTConfig, console: Console | None = None, *, resume: bool = False) -> dict:
    from potstill.models import load_model, load_tokenizer

    console = console or Console(stderr=True)
    if resume:
        check_resumable(cfg.run.output_dir)
    if cfg.train.packing and cfg.train.micro_batch_size != 1:
        raise ConfigError(
            "train.packing: packed rows already hold many examples; set train.micro_batch_size=1"
        )
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    examples, counts = load_examples(cfg, tokenizer)
    console.print(
        f"[bold]{counts['sequences']}[/] sequences, {counts['target_tokens']:,} target tokens "
        f"({counts['skipped_no_target_tokens']} records skipped: no target token fits)"
    )
    model = load_model(
        cfg.model.name,
        dtype=cfg.model.dtype,
        device=cfg.model.device,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    result, final = fit_examples(
        model, tokenizer, examples, config=cfg, model_cfg=cfg.model, train_cfg=cfg.train,
        run_cfg=cfg.run, command="sft", inputs=[cfg.data.source], counts=counts,
        console=console, resume=resume,
    )  # fmt: skip
    console.print(f"[green]done[/] {result['step']} steps; model saved to {final}")
    return result


def fit_examples(
    model, tokenizer, examples: list[Example], *, config, model_cfg, train_cfg, run_cfg,
    command: str, inputs: list[str], counts: dict, console: Console, resume: bool,
) -> tuple[dict, Path]:  # fmt: skip
    """LoRA if asked (seeded), then the shared loop with the SFT loss on `examples` in a run
    directory that keeps `config` (the stage's whole config), then `final/`: what
    `potstill sft` and `potstill rlt warmup` both do.
    Returns the loop's result and the saved model's path."""
    from potstill.models import apply_lora
    from potstill.train.loop import train
    from potstill.train.save import save_final

    if model_cfg.lora:
        torch.manual_seed(train_cfg.seed)  # LoRA's initial weights
        model = apply_lora(model, model_cfg.lora)
        if train_cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    with RunDir(run_cfg.output_dir, command=command, config=config, inputs=inputs) as run:
        run.count(**counts)
        with run.timed("train"):
            result = train(
                cfg=train_cfg,
                model=model,
                examples=examples,
                collate=lambda batch: collate(batch, tokenizer.pad_token_id or 0),
                count_tokens=count_tokens,
                loss_fn=sft_loss,
                run=run,
                log_with=run_cfg.log_with,
                console=console,
                require_checkpoint=resume,
            )
        final = save_final(
            model, tokenizer, run.path / "final", merge=train_cfg.merge_lora,
            base_spec=model_cfg.name,
        )  # fmt: skip
        run.count(steps=result["step"], final_loss=result.get("loss", float("nan")))
    return result, final
