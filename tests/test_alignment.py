"""Aligning two tokenizations by character offsets: on hand-made offsets (fast) and on the real
Qwen2.5-Coder, SmolLM2 and Gemma-3 tokenizers of the offline kit (slow: downloaded once)."""

from __future__ import annotations

import random

import pytest

from potstill.data.alignment import (
    AlignedSpan,
    Alignment,
    align_offsets,
    align_text,
    target_positions,
    token_offsets,
)
from potstill.errors import DataError
from tests.conftest import build_tokenizer

UNICODE = "Ünïcødé — 3 × 4 = 12 ✓"
CODE = "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)"
TEXTS = [
    "Distillation transfers knowledge from a teacher to a student.",
    "Compute 17*23 = 391, then subtract 42; 12345 + 678 = 13023.",
    UNICODE,
    "  two  spaces\nand\ttab 😀 ∑ x² ≤ 10⁻³",
    CODE,
]


def spans_of(alignment: Alignment) -> list[tuple]:
    return [(s.teacher, s.student, s.chars) for s in alignment.spans]


def test_identical_offsets_give_one_span_per_token():
    offsets = [(0, 3), (3, 9), (9, 10), (10, 12)]
    alignment = align_offsets(offsets, offsets)
    assert spans_of(alignment) == [((i, i + 1), (i, i + 1), offsets[i]) for i in range(4)]
    assert alignment.one_to_one_fraction == 1.0
    assert target_positions(alignment) == ([0, 1, 2, 3], [0, 1, 2, 3])


def test_a_split_word_becomes_one_many_to_one_span():
    # teacher: "The" " student" ; student: "The" " stu" "dent"
    alignment = align_offsets([(0, 3), (3, 11)], [(0, 3), (3, 7), (7, 11)], 11)
    assert spans_of(alignment) == [((0, 1), (0, 1), (0, 3)), ((1, 2), (1, 3), (3, 11))]
    assert target_positions(alignment) == ([0, 2], [0, 1])
    # only 1:1 spans followed by a 1:1 span: the first span is followed by a 1:2 one
    assert target_positions(alignment, only_one_to_one=True) == ([], [])


def test_crossing_boundaries_merge_into_one_many_to_many_span():
    # teacher "):\n" "   " vs student "):" "\n   " (the real Qwen/SmolLM2 split of CODE)
    alignment = align_offsets([(0, 3), (3, 6), (6, 7)], [(0, 2), (2, 6), (6, 7)])
    assert spans_of(alignment) == [((0, 2), (0, 2), (0, 6)), ((2, 3), (2, 3), (6, 7))]


def test_overlapping_byte_pieces_are_never_separated():
    # byte-level BPE: "Ü" as two byte tokens that both report (0, 1); "✓" as (0,2) (1,2) (1,2)
    alignment = align_offsets([(0, 1), (1, 3)], [(0, 1), (0, 1), (1, 3), (2, 3), (2, 3)])
    assert spans_of(alignment) == [((0, 1), (0, 2), (0, 1)), ((1, 2), (2, 5), (1, 3))]


def test_empty_offsets_are_skipped_and_reported():
    # student has a BOS (0, 0) in front and an empty special token in the middle
    alignment = align_offsets([(0, 2), (2, 5)], [(0, 0), (0, 2), (2, 2), (2, 5)])
    assert spans_of(alignment) == [((0, 1), (1, 2), (0, 2)), ((1, 2), (3, 4), (2, 5))]
    assert alignment.student_skipped == (0, 2) and alignment.teacher_skipped == ()
    assert target_positions(alignment) == ([1, 3], [0, 1])


def test_a_gap_on_one_side_matches_a_cut_on_either_edge_of_it():
    # teacher drops the space at 3 (no token covers it); student has it in " dogs"
    alignment = align_offsets([(0, 3), (4, 8)], [(0, 3), (3, 8)], 8)
    assert spans_of(alignment) == [((0, 1), (0, 1), (0, 3)), ((1, 2), (1, 2), (3, 8))]
    # ... or as its own token: it joins the next span, nothing is lost
    alignment = align_offsets([(0, 3), (4, 8)], [(0, 3), (3, 4), (4, 8)], 8)
    assert spans_of(alignment) == [((0, 1), (0, 1), (0, 3)), ((1, 2), (1, 3), (3, 8))]


def test_text_covered_by_one_side_only_is_reported_unaligned():
    # the student was truncated after 6 characters; the teacher goes on to 12
    alignment = align_offsets([(0, 3), (3, 6), (6, 9), (9, 12)], [(0, 6)], 12)
    assert spans_of(alignment) == [((0, 2), (0, 1), (0, 6))]
    assert alignment.teacher_unaligned == (2, 3) and alignment.student_unaligned == ()


def test_nothing_to_align():
    assert align_offsets([], []) == Alignment(spans=())
    assert align_offsets([(0, 0)], [(0, 3)]).student_unaligned == (0,)
    assert target_positions(Alignment(spans=())) == ([], [])


def test_malformed_offsets_are_refused():
    with pytest.raises(DataError, match=r"token 1 has offsets \(5, 4\)"):
        align_offsets([(0, 5), (5, 4)], [(0, 5)])


def test_one_to_one_targets_need_the_next_span_one_to_one_too():
    spans = (
        AlignedSpan((0, 1), (0, 1), (0, 1)),
        AlignedSpan((1, 2), (1, 2), (1, 2)),
        AlignedSpan((2, 3), (2, 4), (2, 4)),
        AlignedSpan((3, 4), (4, 5), (4, 5)),
    )
    assert target_positions(Alignment(spans), only_one_to_one=True) == ([0], [0])
    assert target_positions(Alignment(spans)) == ([0, 1, 3, 4], [0, 1, 2, 3])


def random_cuts(rng: random.Random, length: int) -> list[tuple[int, int]]:
    points = sorted(rng.sample(range(1, length), rng.randint(0, length - 1)))
    edges = [0, *points, length]
    return list(zip(edges, edges[1:], strict=False))


def test_random_partitions_align_into_the_coarsest_common_refinement():
    rng = random.Random(0)
    for _ in range(200):
        length = rng.randint(1, 30)
        teacher, student = random_cuts(rng, length), random_cuts(rng, length)
        alignment = align_offsets(teacher, student, length)
        shared = {end for _, end in teacher} & {end for _, end in student}
        # one span per shared boundary, each closing exactly there; every token in one span
        assert [s.chars[1] for s in alignment.spans] == sorted(shared)
        assert [s.teacher for s in alignment.spans][0][0] == 0
        for left, right in zip(alignment.spans, alignment.spans[1:], strict=False):
            assert left.teacher[1] == right.teacher[0] and left.student[1] == right.student[0]
            assert left.chars[1] == right.chars[0]
        assert alignment.spans[-1].teacher[1] == len(teacher)
        assert alignment.spans[-1].student[1] == len(student)


def test_byte_pieces_and_special_tokens_do_not_move_the_spans():
    """Splitting tokens into overlapping pieces (as byte-level BPE does inside one character)
    and inserting empty-offset tokens changes token indices, never the characters of a span."""
    rng = random.Random(1)
    for _ in range(200):
        length = rng.randint(1, 30)
        teacher, student = random_cuts(rng, length), random_cuts(rng, length)
        plain = align_offsets(teacher, student, length)
        noisy, inserted = [], []
        for start, end in student:
            if rng.random() < 0.2:
                inserted.append(len(noisy))
                noisy.append((start, start))  # a special token
            # 1 to 3 pieces: the first covers the token, the rest its last character
            noisy += [(start, end)] + [(end - 1, end)] * rng.randint(0, 2)
        alignment = align_offsets(teacher, noisy, length)
        assert [s.chars for s in alignment.spans] == [s.chars for s in plain.spans]
        assert [s.teacher for s in alignment.spans] == [s.teacher for s in plain.spans]
        assert alignment.student_skipped == tuple(inserted)
        assert alignment.spans[-1].student[1] == len(noisy)


class _SlowTokenizer:
    name_or_path = "my-org/slow-model"
    is_fast = False


def test_a_tokenizer_without_offsets_gets_a_one_line_error():
    with pytest.raises(DataError) as info:
        token_offsets(_SlowTokenizer(), "hello")
    message = str(info.value)
    assert "\n" not in message
    assert "'my-org/slow-model'" in message and "not a fast tokenizer" in message
    assert "use_fast=True" in message
    fast = build_tokenizer()
    with pytest.raises(DataError, match="slow-model"):
        align_text("hello", fast, _SlowTokenizer())


def check_spans_cover_the_text(text: str, teacher, student, alignment: Alignment) -> None:
    """Each span decodes to the same characters on both sides, and the spans tile the text."""
    t_ids, _ = token_offsets(teacher, text)
    s_ids, _ = token_offsets(student, text)
    t_parts, s_parts = [], []
    for span in alignment.spans:
        t_parts.append(teacher.decode(t_ids[slice(*span.teacher)]))
        s_parts.append(student.decode(s_ids[slice(*span.student)]))
        assert t_parts[-1] == s_parts[-1] == text[slice(*span.chars)], span
    assert "".join(t_parts) == "".join(s_parts) == text
    assert [s.chars[1] for s in alignment.spans[:-1]] == [s.chars[0] for s in alignment.spans[1:]]
    assert not alignment.teacher_unaligned and not alignment.student_unaligned


def test_two_tiny_bpe_tokenizers_align_on_every_text():
    teacher, student = build_tokenizer(400), build_tokenizer(270)
    for text in TEXTS:
        alignment = align_text(text, teacher, student)
        check_spans_cover_the_text(text, teacher, student, alignment)
    # the smaller vocabulary splits more: some span is many:1
    assert any(not s.one_to_one for s in align_text(TEXTS[1], teacher, student).spans)


@pytest.fixture(scope="module")
def qwen():
    from potstill.models import load_tokenizer

    return load_tokenizer("qwen2.5-coder-1.5b-instruct")


@pytest.fixture(scope="module")
def smollm2():
    from potstill.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.mark.slow
def test_qwen_and_smollm2_on_unicode_counted_by_hand(qwen, smollm2):
    alignment = align_text(UNICODE, qwen, smollm2)
    assert len(token_offsets(qwen, UNICODE)[0]) == 17
    assert len(token_offsets(smollm2, UNICODE)[0]) == 21
    assert len(alignment.spans) == 17
    # SmolLM2 splits "Ü" into two bytes, "ød" into "ø" "d" and " ✓" into three byte pieces
    uneven = [(s.teacher, s.student, s.chars) for s in alignment.spans if not s.one_to_one]
    assert uneven == [
        ((0, 1), (0, 2), (0, 1)),
        ((4, 5), (5, 7), (4, 6)),
        ((16, 17), (18, 21), (20, 22)),
    ]
    assert alignment.teacher_skipped == alignment.student_skipped == ()
    student_positions, teacher_positions = target_positions(alignment)
    assert student_positions[:3] == [1, 2, 3] and teacher_positions[:3] == [0, 1, 2]
    assert (student_positions[-1], teacher_positions[-1]) == (20, 16)
    check_spans_cover_the_text(UNICODE, qwen, smollm2, alignment)


@pytest.mark.slow
def test_qwen_and_smollm2_on_code_counted_by_hand(qwen, smollm2):
    alignment = align_text(CODE, qwen, smollm2)
    assert len(alignment.spans) == 23
    assert sum(s.one_to_one for s in alignment.spans) == 19
    # Qwen: "):\n" "   " ; SmolLM2: "):" "\n   " : one 2:2 span
    assert AlignedSpan((3, 5), (4, 6), (9, 15)) in alignment.spans
    check_spans_cover_the_text(CODE, qwen, smollm2, alignment)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_qwen_and_smollm2_cover_the_same_text(qwen, smollm2, text):
    check_spans_cover_the_text(text, qwen, smollm2, align_text(text, qwen, smollm2))
    check_spans_cover_the_text(text, smollm2, qwen, align_text(text, smollm2, qwen))


@pytest.mark.slow
def test_identical_tokenizers_give_all_one_to_one_spans(qwen):
    for text in TEXTS[:3] + TEXTS[4:]:
        alignment = align_text(text, qwen, qwen)
        count = len(token_offsets(qwen, text)[0])
        assert len(alignment.spans) == count and alignment.one_to_one_fraction == 1.0
        assert target_positions(alignment) == (list(range(count)), list(range(count)))
    # Qwen cuts " ∑" into two byte pieces, (23, 25) and (24, 25): character offsets cannot place
    # a boundary inside one character, so even identical tokenizers share one 2:2 span there
    alignment = align_text(TEXTS[3], qwen, qwen)
    uneven = [s for s in alignment.spans if not s.one_to_one]
    assert uneven == [AlignedSpan((8, 10), (8, 10), (23, 25))]
    assert all(s.teacher == s.student for s in alignment.spans)


@pytest.mark.slow
def test_one_to_one_targets_predict_the_same_next_token_string(qwen, smollm2):
    text = TEXTS[1]
    alignment = align_text(text, qwen, smollm2)
    q_ids, s_ids = token_offsets(qwen, text)[0], token_offsets(smollm2, text)[0]
    students, teachers = target_positions(alignment, only_one_to_one=True)
    assert len(students) >= 10
    for s, t in zip(students, teachers, strict=True):
        assert smollm2.decode([s_ids[s + 1]]) == qwen.decode([q_ids[t + 1]])


@pytest.mark.slow
def test_gemma_bos_is_skipped_and_spans_cover_the_text(qwen):
    from potstill.models import load_tokenizer

    gemma = load_tokenizer("gemma-3-270m")  # the tokenizer alone: no weights are converted
    alignment = align_text(UNICODE, qwen, gemma)
    assert alignment.student_skipped == (0,)  # <bos> with offsets (0, 0)
    assert len(alignment.spans) == 16 and sum(s.one_to_one for s in alignment.spans) == 15
    # Qwen "Ã¸d" "Ã©" vs Gemma "ø" "dé": one 2:2 span "ødé"
    assert AlignedSpan((4, 6), (5, 7), (4, 7)) in alignment.spans
    for text in TEXTS:
        check_spans_cover_the_text(text, qwen, gemma, align_text(text, qwen, gemma))
