"""The one trainer epilogue (LoRA, run directory, the shared loop, `final/`) and the SFT loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from potstill.config.sections import RunConfig, TrainConfig
from potstill.data.examples import Example, collate, count_tokens
from potstill.losses.reduce import IGNORE_INDEX
from potstill.runs import RunDir
from potstill.train.loop import LossFn, StepHooks


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


@dataclass(frozen=True)
class Fit:
    """What a trainer hands `fit`: its stage (for the run directory) and its training step."""

    command: str
    """The verb, recorded in the manifest ("sft", "distill", "rlt train")."""
    config: object
    """The stage's whole config, kept in the run directory (and compared on resume)."""
    model_cfg: object
    """The trained model's section (name, lora)."""
    train_cfg: TrainConfig
    run_cfg: RunConfig
    inputs: list[str]
    """Input files, fingerprinted in the manifest."""
    counts: dict = field(default_factory=dict)
    """Counts for the manifest, written before training."""


def fit(
    model, tokenizer, examples: Sequence, spec: Fit, *, collate: Callable[[list], dict],
    loss_fn: LossFn, console: Console, resume: bool,
    hooks: Callable[[RunDir, object], StepHooks] | None = None,
    final_metric: str = "loss",
) -> tuple[dict, Path]:  # fmt: skip
    """The one trainer epilogue: LoRA if asked (seeded), gradient checkpointing's input grads,
    the run directory, the shared loop, `final/`, the manifest's counts. Every trainer (sft,
    distill, rlt warmup, rlt train) ends here. `hooks(run, model)` builds the loop's hooks once
    the run directory exists and `model` has its adapters. Returns the loop's result and the
    saved model's path."""
    from potstill.models import apply_lora
    from potstill.train.loop import train
    from potstill.train.save import save_final

    model_cfg, train_cfg = spec.model_cfg, spec.train_cfg
    if model_cfg.lora:
        torch.manual_seed(train_cfg.seed)  # LoRA's initial weights
        model = apply_lora(model, model_cfg.lora)
        if train_cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    with RunDir(
        spec.run_cfg.output_dir, command=spec.command, config=spec.config, inputs=spec.inputs
    ) as run:
        run.count(**spec.counts)
        with run.timed("train"):
            result = train(
                cfg=train_cfg, model=model, examples=examples, collate=collate,
                count_tokens=count_tokens, loss_fn=loss_fn, run=run,
                log_with=spec.run_cfg.log_with, console=console, require_checkpoint=resume,
                hooks=hooks(run, model) if hooks else None,
            )  # fmt: skip
        final = save_final(
            model, tokenizer, run.path / "final", merge=train_cfg.merge_lora,
            base_spec=model_cfg.name,
        )  # fmt: skip
        last = result.get(final_metric, float("nan"))
        run.count(steps=result["step"], **{f"final_{final_metric.removesuffix('_mean')}": last})
    return result, final


def fit_examples(
    model, tokenizer, examples: list[Example], spec: Fit, *, console: Console, resume: bool
) -> tuple[dict, Path]:
    """`fit` with the SFT loss on `examples`: what `potstill sft` and `rlt warmup` do."""
    pad_id = tokenizer.pad_token_id or 0
    return fit(
        model, tokenizer, examples, spec, collate=lambda batch: collate(batch, pad_id),
        loss_fn=sft_loss, console=console, resume=resume,
    )  # fmt: skip
