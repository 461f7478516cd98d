"""`potstill distill`: logit distillation of a student from a teacher's token distributions.

    potstill distill --config configs/distill-cpu.yaml [--resume]

Examples are built exactly as `potstill sft` builds them (prompt masked, target + end-of-turn).
Per micro-batch, top to bottom:

1. on_policy mode only: with probability λ the targets become the student's own samples (GKD);
2. the student's final hidden states at target positions (no [T, V] logits);
3. the teacher: online, its final hidden states from a forward in inference mode (no gradients,
   no logits); offline, the cached top-k ids and log-probs of each record's target tokens;
4. `chunked_kd_loss` projects both through their lm_heads chunk by chunk and mixes
   loss = (1 - α) CE + α T² soft, summed over target tokens / target tokens in the whole window.

The loop (`train.loop.train`) does accumulation, clipping, the LR schedule, checkpoints and exact
resume, and logs the parts (ce, soft, kd_ratio), lr and tokens/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from potstill.data.examples import Example, collate
from potstill.errors import ConfigError, ModelError
from potstill.losses import (
    Balance,
    Schedule,
    TeacherConfidence,
    TeacherHidden,
    TeacherTopK,
    chunked_kd_loss,
)
from potstill.losses.reduce import IGNORE_INDEX
from potstill.train.kd_config import KDRatioConfig
from potstill.train.loop import StepHooks
from potstill.train.offline_teacher import cache_rows


@dataclass
class Item:
    example: Example
    record_id: str
    messages: tuple[dict, ...]
    """The prompt (system + user), for on-policy samples."""
    sampled: bool = False
    """The target is the student's own sample (on-policy)."""
    teacher_view: object | None = None
    """Across vocabularies: the teacher's own tokenization of the record and the aligned
    positions (`train.cross_tokenizer.TeacherView`), or, from a cache, the aligned positions and
    cached rows (`train.cross_tokenizer_cache.CachedPairs`); None with one vocabulary."""
    target: str = ""
    """The target text the example's answer was tokenised from (aligned across tokenizers)."""


def collate_items(
    items: list[Item], pad_id: int, cache=None, temperature: float | None = None
) -> dict[str, torch.Tensor]:
    """sft's tensors, plus (offline) the teacher's top-k of every target token in row order, at
    `temperature` (None: the cache's), and whether the targets are student samples."""
    batch = collate([item.example for item in items], pad_id)
    batch["sampled"] = torch.tensor(any(item.sampled for item in items))
    if cache is not None:
        # Target tokens in row-major order of labels[:, 1:]: each record's, in order.
        parts = [cache_rows(cache, item, temperature) for item in items]
        batch["teacher_ids"] = torch.cat([p.ids for p in parts]).long()
        batch["teacher_log_probs"] = torch.cat([p.log_probs for p in parts]).float()
    return batch


def make_kd_ratio(cfg: KDRatioConfig):
    """The α strategy object of the config (see potstill.losses.weighting); a schedule's length
    is set by the loop, which knows the number of steps."""
    if cfg.strategy == "fixed":
        return cfg.value
    if cfg.strategy == "schedule":
        return Schedule(cfg.start, cfg.end, 1, cfg.shape)
    if cfg.strategy == "teacher_confidence":
        return TeacherConfidence(cfg.confidence, cfg.floor, cfg.ceil)
    return Balance(cfg.share, cfg.momentum)


class DistillHooks(StepHooks):
    """α per step (schedule, balance) and on-policy samples, both resumable."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.strategy = make_kd_ratio(cfg.loss.kd_ratio)
        self.kd_ratio = self.strategy  # a number, or TeacherConfidence (evaluated per token)

    def before_step(self, step: int, steps: int) -> None:
        if isinstance(self.strategy, Schedule):
            # `step` counts finished steps: 0 for the first, steps - 1 for the last, which must
            # reach `end` (a one-step run takes `start`).
            self.strategy.total_steps = max(steps - 1, 1)
            self.kd_ratio = self.strategy(step=step)
        elif isinstance(self.strategy, Balance):
            self.kd_ratio = self.strategy()

    def after_step(self, step: int, logged: dict[str, float]) -> None:
        if isinstance(self.strategy, Balance):
            self.strategy.update(logged["ce"], self.cfg.loss.temperature**2 * logged["soft"])

    def state_dict(self) -> dict:
        if isinstance(self.strategy, Balance):
            return {"ce_ema": self.strategy.ce_ema, "soft_ema": self.strategy.soft_ema}
        return {}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.strategy, Balance) and state:
            self.strategy.ce_ema, self.strategy.soft_ema = state["ce_ema"], state["soft_ema"]

    def rollout(self, model, micro_batch: int, items: list) -> list:
        if self.cfg.teacher.mode != "on_policy":
            return items
        from potstill.train.onpolicy import on_policy_rollout

        return on_policy_rollout(
            items,
            model,
            self.tokenizer,
            seed=self.cfg.train.seed,
            micro_batch=micro_batch,
            cfg=self.cfg.teacher.on_policy,
            max_len=self.cfg.train.max_seq_len,
        )


def online_teacher(teacher, device=None):
    """batch, mask -> TeacherHidden: the teacher's final hidden states at target positions, on
    the student's `device` (default: the teacher's). A teacher on a device of its own
    (teacher.model.device) gets the batch moved there and sends back its hidden states; its
    lm_head is copied to the student's device once, so the fused loss projects both there."""
    backbone, head = teacher.base_model, teacher.get_output_embeddings()
    here = head.weight.device
    device = device or here
    with torch.no_grad():
        weight = head.weight.to(device)
        bias = None if head.bias is None else head.bias.to(device)

    def hidden_states(batch, mask):
        with torch.inference_mode():
            out = backbone(
                input_ids=batch["input_ids"].to(here),
                attention_mask=batch["attention_mask"].to(here),
                position_ids=batch["position_ids"].to(here),
                use_cache=False,
            )
            hidden = out.last_hidden_state[:, :-1][mask.to(here)].to(device)  # (N, H_t)
        return TeacherHidden(hidden, weight, bias)

    return hidden_states


def offline_teacher(batch, mask) -> TeacherTopK:
    return TeacherTopK(batch["teacher_ids"], batch["teacher_log_probs"])


def student_final_hidden(model, batch, mask):
    """(hidden (N, H), lm_head): the student's final hidden states at the `mask` positions of
    labels[:, 1:], in the lm_head's dtype, and the lm_head that projects them."""
    # Through the (possibly DDP-wrapped) model, keeping one logit: the final hidden states
    # (after the last norm) are what the lm_head would see.
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    head = getattr(model, "module", model).get_output_embeddings()
    if head.weight.dim() != 2 or head.weight.numel() == 0:
        raise ConfigError(
            "the student's lm_head is sharded (DeepSpeed ZeRO-3 / FSDP full sharding), which "
            "distill does not gather yet; use DDP, ZeRO-1/2 or FSDP without sharding"
        )
    return out.hidden_states[-1][:, :-1][mask].to(head.weight.dtype), head


def make_loss_fn(cfg, teacher_of, hooks: DistillHooks):
    """(model, micro_batch, window_tokens) -> (loss, parts) for the shared loop."""
    loss_cfg, params = cfg.loss, cfg.loss.divergence_params()

    def kd_step_loss(model, batch, window_tokens):
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX  # (B, T-1)
        hidden, head = student_final_hidden(model, batch, mask)
        # GKD: on the student's own samples the hard label is its own token; only the teacher
        # teaches there.
        kd_ratio = 1.0 if bool(batch["sampled"]) else hooks.kd_ratio
        result = chunked_kd_loss(
            hidden,
            head.weight,
            labels[mask],
            teacher_of(batch, mask),
            student_bias=head.bias,
            divergence=loss_cfg.divergence,
            temperature=loss_cfg.temperature,
            kd_ratio=kd_ratio,
            num_target_tokens=window_tokens,
            tail=loss_cfg.tail,
            chunk_size=loss_cfg.chunk_size,
            **params,
        )
        tokens = result.tokens
        alpha = 0.0 if math.isnan(result.kd_ratio_mean) else result.kd_ratio_mean
        return result.loss, {
            "ce": result.ce_sum / window_tokens,
            "soft": result.soft_sum / window_tokens,
            "kd_ratio": alpha * tokens / window_tokens,
            "sampled_tokens": float(tokens) if bool(batch["sampled"]) else 0.0,
        }

    return kd_step_loss


def load_teacher(cfg, student_vocab: int, device, *, same_vocab: bool = True):
    """The online teacher, one copy per process: beside the student (`device`) unless
    teacher.model.device names a device of its own. `same_vocab=False` (loss.cross_tokenizer)
    accepts an lm_head of another size."""
    from potstill.models import DTYPES, load_model, resolve_device, resolve_dtype
    from potstill.train.frozen_storage import narrow_storage

    spec, storage = cfg.teacher.model, cfg.teacher.storage_dtype
    place = str(device) if spec.device == "auto" else spec.device
    compute = resolve_dtype(spec.dtype, resolve_device(place))
    teacher = load_model(
        spec.name,
        dtype=_load_dtype(spec, DTYPES[storage], compute) if storage else compute,
        device=place,
        trust_remote_code=spec.trust_remote_code,
    )
    teacher.eval().requires_grad_(False)  # never trained: no gradients, no optimizer state
    if storage and DTYPES[storage] != compute:
        narrow_storage(teacher, DTYPES[storage], compute)
    rows = teacher.get_output_embeddings().weight.shape[0]
    if same_vocab and rows != student_vocab:
        raise ModelError(
            f"teacher lm_head has {rows:,} rows, the student's {student_vocab:,}: logit "
            "distillation needs one vocabulary; pick models of one family, or set "
            "loss.cross_tokenizer (e.g. {loss: hybrid}) to distill across vocabularies"
        )
    return teacher


def _load_dtype(spec, storage, compute):
    """Weights saved in the storage dtype load in it (then the norms and lm_head are upcast
    exactly, and the wide copy of every weight never exists at once); wider ones load in the
    compute dtype, so that only the linear layers are rounded."""
    from potstill.models import DTYPES, load_model_config

    config = load_model_config(spec.name, trust_remote_code=spec.trust_remote_code)
    saved = getattr(config, "dtype", None)  # a torch.dtype, or its name in older configs
    return storage if DTYPES.get(saved, saved) == storage else compute
