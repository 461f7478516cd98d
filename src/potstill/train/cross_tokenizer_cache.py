"""Distilling across vocabularies from an offline teacher cache (`teacher.mode: offline` with
`loss.cross_tokenizer`; docs/cross_tokenizer.md, "From a teacher cache").

A cache made with `spans=true` keeps, for every cached row (the teacher's distribution over its
i-th target token), the characters of the record's target text that token covers. That is all
the online path (`train.cross_tokenizer.teacher_view`) needs of the teacher's tokenization, so
the pairing below is the online one, computed from the cache instead of the teacher's tokenizer:

1. the teacher's answer offsets are the spans of the rows that come from the text (the rest,
   (-1, -1), are its end-of-turn), in order: row j is the teacher's answer token j;
2. the student's answer offsets, and the alignment of the two (`data.alignment`, the aligner
   the online path uses);
3. the pairs: the student's last prompt token with row 0 (the teacher's distribution over the
   answer's first token, predicted from its last prompt token), and the last token of every
   aligned span, student position s + prompt with teacher row t + 1 (the teacher's logits at
   its answer token t are its distribution over token t + 1, which row t + 1 holds).

A pair is kept where the student's position predicts a token of its example and the teacher's
row exists (a cache truncated inside the answer has no row after its last token). Per
micro-batch the cached top-k rows at the paired rows stand in for the teacher's logits
(`cached_logits_at_pairs`), and the loss is the online one (`make_cross_loss_fn`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from potstill.data.alignment import align_offsets, answer_offsets, target_positions
from potstill.errors import DataError
from potstill.losses.cross_chunked import TeacherRows
from potstill.losses.reduce import IGNORE_INDEX

MISSING_LOG_PROB = -1e4
"""The log-prob given to teacher tokens outside the cached top k: finite (the losses refuse
inf), and exp() of it is exactly 0 in float32, so the k cached tokens hold all the mass."""
REBUILD_WITH_SPANS = "rebuild it with `potstill teacher cache --set spans=true`"


@dataclass(frozen=True)
class CachedPairs:
    """Which student positions learn from which cached rows of one record's teacher."""

    student_positions: list[int]
    """Positions of the student's sequence whose logits are distilled ..."""
    teacher_rows: list[int]
    """... towards the cached teacher rows with these indices (same length)."""


def _teacher_offsets(spans, answer: str, where: str) -> tuple[list[tuple[int, int]], int]:
    """(the teacher's answer offsets, the length of text they read) from a record's spans."""
    from_text = [tuple(int(v) for v in row) for row in spans if row[0] >= 0]
    outside = len(spans) - len(from_text)
    if any(row[0] < 0 for row in spans[: len(from_text)]) or any(
        end > len(answer) for _, end in from_text
    ):
        raise DataError(
            f"{where}: its cached spans do not fit its {len(answer)}-character target text "
            f"(answer rows first, then the end-of-turn); {REBUILD_WITH_SPANS}"
        )
    # No end-of-turn row: the teacher's example was truncated inside the answer (or right at
    # its end), so the text it read ends with its last token, not with the answer.
    read = len(answer) if outside else max((end for _, end in from_text), default=0)
    return from_text, read


def cached_pairs(student_example, answer: str, student_tokenizer, spans, where: str) -> CachedPairs:
    """The paired (student position, cached teacher row)s of one record (module docstring).
    `spans` (T, 2): the record's cached spans; `where` names the record in errors."""
    teacher_offsets, read = _teacher_offsets(spans, answer, where)
    student_ids = student_example.input_ids
    labels = student_example.labels
    student_start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    student_offsets = answer_offsets(
        student_tokenizer, answer, student_ids[student_start:], "student"
    )
    alignment = align_offsets(teacher_offsets, student_offsets, read)
    span_students, span_teachers = target_positions(alignment)
    pairs = [(student_start - 1, 0)] + [
        (student_start + s, t + 1) for s, t in zip(span_students, span_teachers, strict=True)
    ]
    kept = [(s, r) for s, r in pairs if s >= 0 and s + 1 < len(student_ids) and r < len(spans)]
    return CachedPairs([s for s, _ in kept], [r for _, r in kept])


def pair_with_cache(cache, items, student_tokenizer, source: str) -> None:
    """Each item's `teacher_view` becomes its CachedPairs. Refused in one line: a cache without
    spans, or a record whose target text is not the one the cache was made from (named)."""
    from potstill.teacher.cache_format import text_sha256

    if not cache.has_spans:
        raise DataError(
            f"{cache.path}: the cache has no token spans, which a student with another "
            "tokenizer (loss.cross_tokenizer) needs to align its tokens with the teacher's; "
            f"{REBUILD_WITH_SPANS}"
        )
    for item in items:
        if text_sha256(item.target) != cache.text_sha256(item.record_id):
            raise DataError(
                f"{cache.path}: record '{item.record_id}' was cached from another target text "
                f"than {source} holds; rerun `potstill teacher cache` on these records"
            )
        where = f"{cache.path}: record '{item.record_id}'"
        spans = cache.spans(item.record_id)
        item.teacher_view = cached_pairs(item.example, item.target, student_tokenizer, spans, where)


def collate_cached_pairs(items, cache, temperature=None) -> dict[str, torch.Tensor]:
    """The cached top-k rows at the paired rows, (n, k) ids and log-probs, and the pairs as
    flat (row of the batch, student position) lists, in row order."""
    ids, log_probs = [], []
    for item in items:
        top = cache.get(item.record_id, temperature)  # re-tempered if the cache must be
        rows = torch.tensor(item.teacher_view.teacher_rows, dtype=torch.long)
        ids.append(top.ids[rows])
        log_probs.append(top.log_probs[rows])
    batch_rows = [row for row, item in enumerate(items) for _ in item.teacher_view.teacher_rows]
    return {
        "teacher_ids": torch.cat(ids).long(),
        "teacher_log_probs": torch.cat(log_probs).float(),
        "pair_rows": torch.tensor(batch_rows, dtype=torch.long),
        "pair_student_positions": torch.tensor(
            [p for item in items for p in item.teacher_view.student_positions], dtype=torch.long
        ),
    }


def cached_logits_at_pairs(
    batch, device, *, vocab_size: int, temperature: float
) -> tuple[TeacherRows, int]:
    """(rows, V_t): `rows(lo, hi)` gives logits (hi - lo, V_t) whose softmax at `temperature` is
    each paired row's cached top k, renormalised (the teacher's own distribution when k = V):
    T · log p on the cached ids, T · MISSING_LOG_PROB elsewhere. The cached log-probs are at the
    loss's temperature (`open_teacher_cache` checks), so softmax(T · log p / T) gives p back.
    Rows are built chunk by chunk from the (n, k) rows, never (n, V_t) at once."""
    ids = batch["teacher_ids"].to(device)  # (n, k)
    log_probs = batch["teacher_log_probs"].to(device).float().clamp(min=MISSING_LOG_PROB)

    def rows_of(lo: int, hi: int) -> torch.Tensor:
        logits = torch.full((hi - lo, vocab_size), MISSING_LOG_PROB * temperature, device=device)
        return logits.scatter_(1, ids[lo:hi], log_probs[lo:hi] * temperature)

    return rows_of, vocab_size


def cached_teacher(cache, temperature: float):
    """(batch, device) -> (rows, V_t): the teacher at the pairs, from the cache's rows."""
    vocab = int(cache.meta["vocab_size"])
    return functools.partial(cached_logits_at_pairs, vocab_size=vocab, temperature=temperature)
