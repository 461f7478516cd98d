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

from dataclasses import dataclass, field

from rich.console import Console

from potstill.config.sections import LoraConfig, ModelConfig, RunConfig, SFTDataConfig, TrainConfig
from potstill.data import read_records
from potstill.data.examples import Example, examples_line, pack, record_examples
from potstill.errors import ConfigError, DataError
from potstill.train.checkpoint import check_resumable
from potstill.train.fit import Fit, fit_examples


@dataclass
class SFTConfig:
    """Supervised fine-tuning of a student on records (loss on the target tokens only)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(lora=LoraConfig()))
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/sft"))


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
    from potstill.models import load_section_model, load_tokenizer

    console = console or Console(stderr=True)
    if resume:
        check_resumable(cfg.run.output_dir)
    if cfg.train.packing and cfg.train.micro_batch_size != 1:
        raise ConfigError(
            "train.packing: packed rows already hold many examples; set train.micro_batch_size=1"
        )
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    examples, counts = load_examples(cfg, tokenizer)
    console.print(examples_line(counts))
    model = load_section_model(cfg.model)  # the tokenizer is loaded above
    spec = Fit("sft", cfg, cfg.model, cfg.train, cfg.run, [cfg.data.source], counts)
    result, final = fit_examples(model, tokenizer, examples, spec, console=console, resume=resume)
    console.print(f"[green]done[/] {result['step']} steps; model saved to {final}")
    return result
