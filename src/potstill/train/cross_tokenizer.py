"""Online distillation across vocabularies: the glue between records, the alignment and the
cross-vocabulary losses (`loss.cross_tokenizer`; docs/cross_tokenizer.md, "Using it").

Per record, once, before training (`teacher_view`):

1. the student's example is the one every trainer builds (`data.examples.build_example`);
2. the teacher gets the same conversation through ITS chat template, and the same answer text
   after it, tokenised the same way (prompt and answer apart, then its end-of-turn);
3. the answer's two tokenizations are aligned by character offsets (`data.alignment`). Both
   sides tokenise the answer on its own, so its offsets count from the answer's first character
   in either rendering: the templates around it, which differ, never enter the alignment;
4. the paired positions are the last prompt token on each side (both have read the whole
   conversation and predict the answer's first token) and the last token of every aligned span
   (`target_positions`), as positions of each side's full sequence.

Per micro-batch (`make_cross_loss_fn`): the student's logits at its target positions give the
hard loss as in same-vocabulary distillation; the teacher, in inference mode on its own
sequences, gives its logits at the paired positions; the soft loss is `uld` or `hybrid` between
the paired rows, summed, and mixed by `weighting.mix`:

    loss = [(1 − α) Σ_targets CE + α T² Σ_pairs soft] / target tokens in the window

i.e. a target position without a partner contributes no soft loss. With one tokenizer every
target position is paired, and `hybrid` with the identity match is the same-vocabulary loss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from potstill.data.alignment import (
    align_offsets,
    answer_offsets,
    target_positions,
    token_offsets,
)
from potstill.data.chat import end_of_turn_ids, render_chat
from potstill.data.examples import Example
from potstill.losses.cross_chunked import TeacherRows, chunked_cross_sums
from potstill.losses.cross_vocab import hybrid, uld, vocab_matches
from potstill.losses.reduce import IGNORE_INDEX
from potstill.losses.weighting import mix
from potstill.train.kd import DistillHooks, student_final_hidden


@dataclass(frozen=True)
class TeacherView:
    """One record as the teacher sees it, and which positions of the two sequences are paired."""

    input_ids: list[int]
    """The teacher's tokens: its rendering of the prompt, the answer, its end-of-turn
    (truncated to train.max_seq_len like the student's)."""
    student_positions: list[int]
    """Positions of the student's sequence whose logits are distilled ..."""
    teacher_positions: list[int]
    """... towards the teacher's logits at these positions (same length)."""
    pad_id: int
    """The teacher tokenizer's padding id."""


def _prompt_length(example: Example) -> int:
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)


def teacher_view(
    student_example: Example, messages, answer: str, student_tokenizer, teacher_tokenizer,
    max_len: int,
) -> TeacherView:  # fmt: skip
    """The teacher's tokens of one record and the paired positions (see the module docstring).

    A pair is kept only where both positions exist after truncation and the student's predicts
    a token the student's example has (a target position, so it is counted in the window)."""
    prompt = render_chat(teacher_tokenizer, messages)
    teacher_prompt = teacher_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    teacher_answer, teacher_offsets = token_offsets(
        teacher_tokenizer, answer, add_special_tokens=False
    )
    teacher_ids = [*teacher_prompt, *teacher_answer, *end_of_turn_ids(teacher_tokenizer)]
    teacher_ids = teacher_ids[:max_len]

    student_start = _prompt_length(student_example)
    student_ids = student_example.input_ids
    student_offsets = answer_offsets(
        student_tokenizer, answer, student_ids[student_start:], "student"
    )
    alignment = align_offsets(teacher_offsets, student_offsets, len(answer))
    span_students, span_teachers = target_positions(alignment)
    pairs = [(student_start - 1, len(teacher_prompt) - 1)] + [
        (student_start + s, len(teacher_prompt) + t)
        for s, t in zip(span_students, span_teachers, strict=True)
    ]
    kept = [
        (s, t)
        for s, t in pairs
        if s >= 0 and t >= 0 and s + 1 < len(student_ids) and t < len(teacher_ids)
    ]
    pad_id = teacher_tokenizer.pad_token_id
    return TeacherView(
        input_ids=teacher_ids,
        student_positions=[s for s, _ in kept],
        teacher_positions=[t for _, t in kept],
        pad_id=0 if pad_id is None else pad_id,
    )


def collate_teacher_views(views: list[TeacherView]) -> dict[str, torch.Tensor]:
    """The teacher's right-padded batch and the pairs as flat (row, student position, teacher
    position) lists, in row order."""
    width = max(len(v.input_ids) for v in views)
    pad = views[0].pad_id

    def padded(rows, fill):
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)

    rows = [row for row, v in enumerate(views) for _ in v.student_positions]
    return {
        "teacher_input_ids": padded([v.input_ids for v in views], pad),
        "teacher_attention_mask": padded([[1] * len(v.input_ids) for v in views], 0),
        "teacher_position_ids": padded([list(range(len(v.input_ids))) for v in views], 0),
        "pair_rows": torch.tensor(rows, dtype=torch.long),
        "pair_student_positions": torch.tensor(
            [p for v in views for p in v.student_positions], dtype=torch.long
        ),
        "pair_teacher_positions": torch.tensor(
            [p for v in views for p in v.teacher_positions], dtype=torch.long
        ),
    }


def make_soft_loss(cfg, teacher_tokenizer, student_tokenizer):
    """(student rows (n, V_s), teacher rows (n, V_t)) -> (n,): the configured `uld` or `hybrid`,
    picked once (not per step)."""
    cross, loss_cfg = cfg.loss.cross_tokenizer, cfg.loss
    if cross.loss == "uld":
        return functools.partial(uld, temperature=loss_cfg.temperature, top_k=cross.top_k)
    match = vocab_matches(teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab())
    return functools.partial(
        hybrid,
        match=match,
        divergence=loss_cfg.divergence,
        temperature=loss_cfg.temperature,
        matched_weight=cross.matched_weight,
        unmatched_weight=cross.unmatched_weight,
        top_k=cross.top_k,
        **loss_cfg.divergence_params(),
    )


def teacher_rows_at_pairs(teacher, batch, device) -> tuple[TeacherRows, int]:
    """(rows, V_t): `rows(lo, hi)` gives the online teacher's logits at pairs lo..hi-1 on
    `device`, no gradients. The teacher runs once per micro-batch; only its final hidden states
    at the pairs (n, H_t) are kept, and each chunk of the loss projects its own rows, so the
    teacher's (n, V_t) logits are never built whole."""
    head = teacher.get_output_embeddings()
    here = head.weight.device
    with torch.inference_mode():
        out = teacher.base_model(
            input_ids=batch["teacher_input_ids"].to(here),
            attention_mask=batch["teacher_attention_mask"].to(here),
            position_ids=batch["teacher_position_ids"].to(here),
            use_cache=False,
        )
        rows, positions = batch["pair_rows"].to(here), batch["pair_teacher_positions"].to(here)
        hidden = out.last_hidden_state[rows, positions]
    hidden = hidden.clone()  # out of inference mode: the loss projects it under autograd

    def rows_of(lo: int, hi: int) -> torch.Tensor:
        with torch.no_grad():
            return F.linear(hidden[lo:hi], head.weight, head.bias).to(device)

    return rows_of, int(head.weight.shape[0])


def online_teacher_at_pairs(teacher):
    """(batch, device) -> (rows, V_t): the online teacher at the paired positions."""
    return functools.partial(teacher_rows_at_pairs, teacher)


def make_cross_loss_fn(cfg, teacher_at_pairs, soft_loss, hooks: DistillHooks):
    """(model, micro_batch, window_tokens) -> (loss, parts) for the shared loop, across
    vocabularies. `teacher_at_pairs(batch, device)` gives (rows, V_t), `rows(lo, hi)` the
    teacher's logits at pairs lo..hi-1, online (`online_teacher_at_pairs`) or from a cache
    (`cross_tokenizer_cache.cached_teacher`); the losses run chunk by chunk from the student's
    hidden states (`losses.cross_chunked`), so neither side's logits are built whole. Logs
    what same-vocabulary distill logs, plus `aligned`: paired positions per target token of the
    window (1.0 when every target position has a partner)."""
    temperature = cfg.loss.temperature

    def cross_step_loss(model, batch, window_tokens):
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX  # (B, T-1)
        hidden, head = student_final_hidden(model, batch, mask)  # (N, H)
        # target row of each (row, position) of the batch: mask is row-major, so the pairs,
        # listed in row order, are increasing rows
        row_of = (mask.flatten().cumsum(0) - 1).view(mask.shape)
        paired = row_of[batch["pair_rows"], batch["pair_student_positions"]]  # (n,)
        teacher_rows, teacher_vocab = teacher_at_pairs(batch, hidden.device)
        ce_sum, soft_sum = chunked_cross_sums(
            hidden, head.weight, head.bias, labels[mask], paired, teacher_rows, soft_loss,
            teacher_vocab=teacher_vocab, chunk_size=cfg.loss.chunk_size,
        )  # fmt: skip
        kd_ratio = hooks.kd_ratio
        loss = mix(ce_sum, soft_sum, kd_ratio, temperature) / window_tokens
        tokens = int(mask.sum())
        return loss, {
            "ce": ce_sum.item() / window_tokens,
            "soft": soft_sum.item() / window_tokens,
            "kd_ratio": kd_ratio * tokens / window_tokens,
            "sampled_tokens": 0.0,
            "aligned": paired.numel() / window_tokens,
        }

    return cross_step_loss
