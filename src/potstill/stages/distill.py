"""`potstill distill`: logit distillation with the teacher online, from an offline top-k cache,
or on-policy.

    potstill distill --config configs/distill.yaml [--resume]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console

from potstill.config import check
from potstill.config.sections import LoraConfig, ModelConfig, RunConfig, SFTDataConfig, TrainConfig
from potstill.data import read_records
from potstill.data.examples import examples_line, record_examples
from potstill.errors import DataError, ModelError
from potstill.run_checks import check_same_config
from potstill.train.checkpoint import check_resumable
from potstill.train.cross_tokenizer import (
    collate_teacher_views,
    make_cross_loss_fn,
    make_soft_loss,
    online_teacher_at_pairs,
    teacher_view,
)
from potstill.train.cross_tokenizer_cache import (
    cached_teacher,
    collate_cached_pairs,
    pair_with_cache,
)
from potstill.train.fit import Fit, fit
from potstill.train.kd import (
    DistillHooks,
    Item,
    collate_items,
    load_teacher,
    make_loss_fn,
    offline_teacher,
    online_teacher,
)
from potstill.train.kd_config import DistillTeacherConfig, KDLossConfig
from potstill.train.offline_teacher import open_teacher_cache


@dataclass
class DistillConfig:
    """Logit distillation: the student learns the teacher's token distributions on records."""

    student: ModelConfig = field(default_factory=lambda: ModelConfig(lora=LoraConfig()))
    """The student being trained (LoRA by default; omit lora for full fine-tuning)."""
    teacher: DistillTeacherConfig = field(default_factory=DistillTeacherConfig)
    """The teacher and where its distributions come from."""
    loss: KDLossConfig = field(default_factory=KDLossConfig)
    """Divergence, temperature, hard/soft mix."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Records: prompt (system prompt + prompt_field) and target (target_field)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4))
    """Optimiser, schedule, batch, checkpoints."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/distill"))

    def __post_init__(self):
        check(
            not self.train.packing,
            "train.packing: not supported by distill (teacher positions follow each record); "
            "set train.packing=false",
        )
        if self.loss.cross_tokenizer is not None:
            check(
                self.teacher.mode != "on_policy",
                "loss.cross_tokenizer with teacher.mode=on_policy: on-policy samples are not "
                "re-tokenised for the teacher yet; use teacher.mode=online or offline",
            )
            check(
                self.loss.kd_ratio.strategy != "teacher_confidence",
                "loss.kd_ratio.strategy=teacher_confidence needs the teacher's probability of "
                "the student's gold token, which another vocabulary does not have; use fixed, "
                "schedule or balance with loss.cross_tokenizer",
            )


def load_items(
    cfg: DistillConfig, tokenizer, teacher_tokenizer=None
) -> tuple[list[Item], dict[str, int]]:
    """One item per record with a target token left after truncation (the others are counted).
    With `teacher_tokenizer` (loss.cross_tokenizer) each item carries the teacher's own view."""
    data, max_len = cfg.data, cfg.train.max_seq_len
    records = read_records(data.source, limit=data.limit)
    built = record_examples(records, data, tokenizer, max_len, where=data.source)
    items = []
    for rec, msgs, ex in built:
        if ex is None:
            continue
        view, answer = None, rec[data.target_field]
        if teacher_tokenizer is not None:
            view = teacher_view(ex, msgs, answer, tokenizer, teacher_tokenizer, max_len)
        items.append(Item(ex, str(rec["id"]), msgs, teacher_view=view, target=answer))
    skipped = len(records) - len(items)
    if not items:
        raise DataError(
            f"{data.source}: no record has a target token within train.max_seq_len="
            f"{cfg.train.max_seq_len}; raise it"
        )
    counts = {
        "records": len(records),
        "skipped_no_target_tokens": skipped,
        "sequences": len(items),
        "target_tokens": sum(i.example.target_tokens for i in items),
    }
    if teacher_tokenizer is not None:
        counts["aligned_positions"] = sum(len(i.teacher_view.student_positions) for i in items)
    return items, counts


def check_one_vocab(teacher_tokenizer, tokenizer) -> None:
    """`models.check_same_vocab`, its refusal pointing at loss.cross_tokenizer."""
    from potstill.models import check_same_vocab

    try:
        check_same_vocab(teacher_tokenizer, tokenizer)
    except ModelError as exc:
        raise ModelError(
            f"{exc}, or set loss.cross_tokenizer (e.g. --set 'loss.cross_tokenizer={{loss: "
            "hybrid}') to distill across vocabularies"
        ) from None


def run_distill(cfg: DistillConfig, console: Console | None = None, *, resume: bool = False):
    from potstill.models import load_section_model, load_tokenizer

    console = console or Console(stderr=True)
    check_same_config(cfg.run.output_dir, cfg)  # a changed --resume fails before any loading
    if resume:
        check_resumable(cfg.run.output_dir)
    tokenizer = load_tokenizer(cfg.student.name, trust_remote_code=cfg.student.trust_remote_code)
    online = cfg.teacher.mode != "offline"
    cross = cfg.loss.cross_tokenizer is not None
    teacher_tokenizer = None
    if online or cross:  # offline across vocabularies: its vocabulary strings, not its weights
        spec = cfg.teacher.model
        teacher_tokenizer = load_tokenizer(spec.name, trust_remote_code=spec.trust_remote_code)
        if not cross:
            check_one_vocab(teacher_tokenizer, tokenizer)
    items, counts = load_items(cfg, tokenizer, teacher_tokenizer if cross and online else None)
    console.print(examples_line(counts))
    student = load_section_model(cfg.student)  # the tokenizer is loaded above
    vocab = student.get_output_embeddings().weight.shape[0]
    cache = None
    if not online:
        rebuild = lambda tok: load_items(cfg, tok)[0]  # noqa: E731 - items as the teacher builds them
        cross_teacher = teacher_tokenizer if cross else None
        cache = open_teacher_cache(
            cfg, tokenizer, vocab, items, rebuild, teacher_tokenizer=cross_teacher
        )
        if cross:
            pair_with_cache(cache, items, tokenizer, cfg.data.source)
            counts["aligned_positions"] = sum(len(i.teacher_view.teacher_rows) for i in items)
    device = student.device
    teacher = load_teacher(cfg, vocab, device, same_vocab=not cross) if online else None
    hooks = DistillHooks(cfg, tokenizer)
    if cross:
        soft_loss = make_soft_loss(cfg, teacher_tokenizer, tokenizer)
        at_pairs = (
            online_teacher_at_pairs(teacher)
            if online
            else cached_teacher(cache, cfg.loss.temperature)
        )
        loss_fn = make_cross_loss_fn(cfg, at_pairs, soft_loss, hooks)
    else:
        teacher_of = online_teacher(teacher, device) if online else offline_teacher
        loss_fn = make_loss_fn(cfg, teacher_of, hooks)
    pad_id = tokenizer.pad_token_id or 0

    def collate(batch):
        tensors = collate_items(batch, pad_id, None if cross else cache, cfg.loss.temperature)
        if cross and online:
            tensors.update(collate_teacher_views([item.teacher_view for item in batch]))
        elif cross:
            tensors.update(collate_cached_pairs(batch, cache, cfg.loss.temperature))
        return tensors

    inputs = [cfg.data.source] + ([cfg.teacher.cache] if cache is not None else [])
    spec = Fit("distill", cfg, cfg.student, cfg.train, cfg.run, inputs, counts)
    result, final = fit(
        student, tokenizer, items, spec,
        collate=collate, loss_fn=loss_fn, console=console, resume=resume,
        hooks=lambda run, model: hooks,
    )  # fmt: skip
    console.print(f"[green]done[/] {result['step']} steps; model saved to {final}")
    return result
