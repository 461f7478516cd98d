"""Align two tokenizations of one text by character offsets (cross-tokenizer distillation).

A teacher and a student with different tokenizers cut the same text at different places. Logit
distillation needs pairs of positions whose distributions are about the same thing; this module
finds them from the character offsets a Hugging Face fast tokenizer reports
(`return_offsets_mapping=True`):

    alignment = align_text(text, teacher_tokenizer, student_tokenizer)
    student_positions, teacher_positions = target_positions(alignment)

An *aligned span* is a smallest group of consecutive tokens on each side that starts and ends
at a character boundary both tokenizations share: teacher tokens [a, b) and student tokens [c, d)
cover the same characters. Where both sides agree token by token every span is 1:1; where one side
splits a word (or a multi-byte character) the other keeps whole, the span is many:1 or many:many.

Offsets are not always a clean partition of the text, and the rules below say what is done:
- tokens with empty offsets (start == end: BOS and other added special tokens) cover no text; they
  are left out of every span and listed in `Alignment.teacher_skipped` / `student_skipped`;
- byte-level BPE splits one multi-byte character into several tokens that report overlapping
  offsets (SmolLM2 gives 'Ã' (0, 1) and 'ľ' (0, 1) for "Ü"): no boundary is placed inside an
  overlap, so such pieces always end up in the same span (also between identical tokenizers:
  character offsets cannot say which bytes of one character each piece holds);
- gaps (characters no token covers, e.g. a tokenizer that drops spaces) belong to no token: a
  boundary may sit anywhere in a gap, so a cut after the gap on one side matches a cut before it
  on the other;
- where the sides cover different text (one truncated, or one dropped characters the other kept),
  the tokens past the last shared boundary are in no span (`teacher_unaligned`,
  `student_unaligned`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from potstill.errors import DataError

Offsets = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class AlignedSpan:
    """Teacher tokens [teacher[0], teacher[1]) and student tokens [student[0], student[1])
    (indices into each side's full token sequence) covering the characters [chars[0], chars[1])."""

    teacher: tuple[int, int]
    student: tuple[int, int]
    chars: tuple[int, int]

    @property
    def one_to_one(self) -> bool:
        return self.teacher[1] - self.teacher[0] == 1 and self.student[1] - self.student[0] == 1


@dataclass(frozen=True)
class Alignment:
    """The aligned spans of one text, in order, and the tokens that are in none of them."""

    spans: tuple[AlignedSpan, ...]
    teacher_skipped: tuple[int, ...] = ()
    """Teacher token indices with empty offsets (special tokens): they cover no text."""
    student_skipped: tuple[int, ...] = ()
    teacher_unaligned: tuple[int, ...] = ()
    """Teacher tokens with text that no shared boundary closes (the sides cover different text)."""
    student_unaligned: tuple[int, ...] = ()

    @property
    def one_to_one_fraction(self) -> float:
        return sum(s.one_to_one for s in self.spans) / len(self.spans) if self.spans else 0.0


@dataclass(frozen=True)
class _Cut:
    """A boundary between two runs of tokens: it may sit anywhere in [low, high] (a gap)."""

    after: int  # tokens [0, after) of the non-empty list lie before it
    low: int
    high: int


def _cuts(offsets: Offsets, text_length: int) -> list[_Cut]:
    """Every place one side's tokens can be cut, with the text's start and end as the outer cuts.

    A cut after token i exists only if no earlier token ends past where a later one starts, so
    overlapping pieces of one character are never separated.
    """
    count = len(offsets)
    suffix_min_start = [text_length] * (count + 1)
    for i in range(count - 1, -1, -1):
        suffix_min_start[i] = min(offsets[i][0], suffix_min_start[i + 1])
    cuts = [_Cut(0, 0, suffix_min_start[0])]
    prefix_max_end = 0
    for i in range(count):
        prefix_max_end = max(prefix_max_end, offsets[i][1])
        if i + 1 < count and prefix_max_end <= suffix_min_start[i + 1]:
            cuts.append(_Cut(i + 1, prefix_max_end, suffix_min_start[i + 1]))
    if count:
        cuts.append(_Cut(count, prefix_max_end, max(text_length, prefix_max_end)))
    return cuts


def _shared_cuts(teacher_cuts: list[_Cut], student_cuts: list[_Cut]) -> list[tuple[_Cut, _Cut]]:
    """Pairs of cuts whose ranges meet, in order, each cut used once (two pointers)."""
    pairs, i, j = [], 0, 0
    while i < len(teacher_cuts) and j < len(student_cuts):
        t, s = teacher_cuts[i], student_cuts[j]
        if t.high < s.low:
            i += 1
        elif s.high < t.low:
            j += 1
        else:
            pairs.append((t, s))
            i, j = i + 1, j + 1
    return pairs


def _non_empty(offsets: Offsets) -> tuple[list[int], list[int]]:
    """(indices of tokens that cover text, indices of tokens with empty offsets)."""
    kept, skipped = [], []
    for index, (start, end) in enumerate(offsets):
        if end < start or start < 0:
            raise DataError(f"token {index} has offsets ({start}, {end}): not a character range")
        (kept if end > start else skipped).append(index)
    return kept, skipped


def align_offsets(
    teacher_offsets: Offsets, student_offsets: Offsets, text_length: int | None = None
) -> Alignment:
    """Aligned spans of two tokenizations of one text, from their (start, end) character offsets.

    `text_length` bounds the last cut (default: the furthest offset). Pure: no tokenizer needed.
    """
    t_kept, t_skipped = _non_empty(teacher_offsets)
    s_kept, s_skipped = _non_empty(student_offsets)
    t_off = [tuple(teacher_offsets[i]) for i in t_kept]
    s_off = [tuple(student_offsets[i]) for i in s_kept]
    if text_length is None:
        text_length = max([end for _, end in t_off + s_off], default=0)
    pairs = _shared_cuts(_cuts(t_off, text_length), _cuts(s_off, text_length))
    spans = []
    for (t_open, s_open), (t_close, s_close) in zip(pairs, pairs[1:], strict=False):
        t_run, s_run = t_off[t_open.after : t_close.after], s_off[s_open.after : s_close.after]
        spans.append(
            AlignedSpan(
                teacher=(t_kept[t_open.after], t_kept[t_close.after - 1] + 1),
                student=(s_kept[s_open.after], s_kept[s_close.after - 1] + 1),
                chars=(
                    min(start for start, _ in t_run + s_run),
                    max(end for _, end in t_run + s_run),
                ),
            )
        )
    t_last, s_last = (pairs[-1][0].after, pairs[-1][1].after) if pairs else (0, 0)
    return Alignment(
        spans=tuple(spans),
        teacher_skipped=tuple(t_skipped),
        student_skipped=tuple(s_skipped),
        teacher_unaligned=tuple(t_kept[t_last:]),
        student_unaligned=tuple(s_kept[s_last:]),
    )


def token_offsets(
    tokenizer, text: str, *, add_special_tokens: bool = True
) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids, character offsets) of `text`; a DataError naming the tokenizer if it cannot
    report offsets (only Hugging Face *fast* tokenizers can)."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer '{name}' ({type(tokenizer).__name__}) is not a fast tokenizer and cannot "
            "report character offsets; load it with AutoTokenizer.from_pretrained(..., "
            "use_fast=True) or from a folder holding tokenizer.json"
        )
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    offsets = [(int(start), int(end)) for start, end in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), offsets


def answer_offsets(
    tokenizer, answer: str, expected: Sequence[int], side: str
) -> list[tuple[int, int]]:
    """The answer's token offsets (from its first character), tokenised on its own as
    `build_example` tokenises a target. The ids must be the ones an example holds (`expected`:
    its target ids, maybe truncated or ending in the end-of-turn), or positions would point at
    other tokens; `side` ("student", "teacher") names the tokenizer in the DataError."""
    ids, offsets = token_offsets(tokenizer, answer, add_special_tokens=False)
    shared = min(len(ids), len(expected))
    if list(ids[:shared]) != list(expected[:shared]):
        raise DataError(
            f"the {side} tokenizer gives other ids for an answer tokenised with offsets than "
            "without; cross-tokenizer distillation needs a tokenizer whose ids do not depend on "
            "return_offsets_mapping"
        )
    return offsets


def target_spans(tokenizer, labels: Sequence[int], answer: str) -> list[tuple[int, int]]:
    """Per predicted target token of an example (t >= 1 with a label, the rows of a teacher
    cache), the characters [start, end) of `answer` it covers; (-1, -1) for one that is not
    from the answer (the end-of-turn after it). `labels` are the example's, built from `answer`
    by `build_example` (IGNORE_INDEX = -100 on the prompt)."""
    prompt = next(i for i, label in enumerate(labels) if label != -100)
    if prompt == 0:  # row i would be the answer's token i + 1: not what readers assume
        raise DataError("an example with no prompt token has no row for its first target token")
    offsets = answer_offsets(tokenizer, answer, labels[prompt:], "teacher")
    rows = [t - prompt for t in range(1, len(labels)) if labels[t] != -100]
    return [offsets[r] if r < len(offsets) else (-1, -1) for r in rows]


def align_text(
    text: str, teacher_tokenizer, student_tokenizer, *, add_special_tokens: bool = True
) -> Alignment:
    """Tokenize `text` with both tokenizers and align the two token sequences (`align_offsets`).

    Token indices in the result index each tokenizer's own `input_ids` of `text` (special tokens
    it adds included), i.e. the positions of that model's logits.
    """
    _, teacher_offsets = token_offsets(
        teacher_tokenizer, text, add_special_tokens=add_special_tokens
    )
    _, student_offsets = token_offsets(
        student_tokenizer, text, add_special_tokens=add_special_tokens
    )
    return align_offsets(teacher_offsets, student_offsets, len(text))


def target_positions(
    alignment: Alignment, *, only_one_to_one: bool = False
) -> tuple[list[int], list[int]]:
    """(student positions, teacher positions): whose teacher distribution each student position
    is distilled towards. Both lists have one entry per aligned span.

    Choice: the LAST token of each span on both sides. A causal LM's logits at position i predict
    what follows token i; at the last token of a span both models have read exactly the same text
    (up to the span's shared end boundary) and both predict what comes after it. So the two
    distributions are conditioned on the same characters, and they score next tokens that start at
    the same character. When the next span is 1:1 with the same string on both sides they predict
    the same event exactly; otherwise the teacher's next token may be longer or shorter than the
    student's (ULD, which ignores token identity, is made for that case). Taking the first token
    of a span instead would compare a student that has read less than the teacher (or more).

    `only_one_to_one` keeps the spans that are 1:1 and whose following span is too, the positions
    where both models predict a token that starts and ends at the same characters.
    """
    spans = alignment.spans
    student, teacher = [], []
    for index, span in enumerate(spans):
        if only_one_to_one:
            following = spans[index + 1] if index + 1 < len(spans) else None
            if not (span.one_to_one and following is not None and following.one_to_one):
                continue
        student.append(span.student[1] - 1)
        teacher.append(span.teacher[1] - 1)
    return student, teacher
