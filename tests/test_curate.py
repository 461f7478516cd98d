"""Curation filters, each on hand-written samples with real verifiers."""

from __future__ import annotations

import pytest

from potstill.curate.filters import (
    check_format,
    check_length,
    dedup_samples,
    drop_solved_by_student,
    solve_rates,
    verify_samples,
)
from potstill.curate.select import select_per_question
from potstill.data import read_records
from potstill.errors import DataError

from .curate_samples import LONG_TRACE, ids, reasons, sample

# --- format, length ---------------------------------------------------------------------------


def test_format_drops_truncated_unclosed_and_missing_pattern():
    records = [
        sample("ok", "<think>add them</think> Answer: 16"),
        sample("cut", "<think>add them</think> Answer: 16", finish_reason="length"),
        sample("open", "<think>add them and then"),
        sample("nested", "<think>a <think>b</think></think> 16"),
        sample("reversed", "</think> a <think> 16"),
        sample("prefilled", "add them</think> Answer: 16"),  # the chat template opened it
        sample("no_tags", "Answer: 16", finish_reason="stop"),
    ]
    kept, dropped = check_format(records)
    assert ids(kept) == ["ok", "prefilled", "no_tags"]
    assert reasons(dropped) == {
        "cut": "truncated",
        "open": "unclosed_tag",
        "nested": "unclosed_tag",
        "reversed": "unclosed_tag",
    }
    assert all("drop_reason" not in r for r in kept)

    kept, dropped = check_format(
        records[:3], drop_truncated=False, tags=[("<answer>", "</answer>")], require=r"Answer:"
    )
    assert ids(kept) == ["ok", "cut"]
    assert reasons(dropped) == {"open": "missing_pattern"}


def test_length_uses_completion_tokens_else_words():
    records = [
        sample("empty", "   "),
        sample("two_words", "Answer: 16"),
        sample("counted", "Answer: 16", completion_tokens=50),
        sample("long", " ".join(["word"] * 30)),
    ]
    kept, dropped = check_length(records, min_tokens=2, max_tokens=40)
    assert ids(kept) == ["two_words", "long"]
    assert reasons(dropped) == {"empty": "too_short", "counted": "too_long"}


# --- verify -------------------------------------------------------------------------------------


def test_verify_with_reasoning_gym_scorer():
    q0, q1, *_ = read_records("rg:basic_arithmetic?size=4&seed=1")
    assert (q0["answer"], q1["answer"]) == ("-4", "3")
    records = [
        {**q0, "id": "right", "completion": "5 - 3 = 2, 2 - 6 = -4. Answer: -4"},
        {**q0, "id": "wrong", "completion": "5 - 3 = 2, 2 + 6 = 8. Answer: 8"},
        {**q1, "id": "silent", "completion": "I would rather not say."},
    ]
    kept, dropped = verify_samples(records)
    assert ids(kept) == ["right"]
    assert kept[0]["verified"] is True and kept[0]["score"] == 1.0
    assert reasons(dropped) == {"wrong": "wrong_answer", "silent": "no_answer"}
    assert all(r["verified"] is False and r["score"] == 0.0 for r in dropped)
    assert {k: v for k, v in kept[0].items() if k not in ("verified", "score")} == records[0]


def test_verify_gsm_symbolic_math_exact_and_regex():
    gsm = read_records("rg:gsm_symbolic?size=1&seed=1")[0]
    half = {"question": "Half of one?", "task": "math"}
    records = [
        {**gsm, "id": "gsm", "completion": f"Step by step ... #### {gsm['answer']}"},
        {**half, "id": "frac_vs_decimal", "answer": "0.5", "completion": r"\boxed{\frac{1}{2}}"},
        {**half, "id": "math_wrong", "answer": "0.5", "completion": r"\boxed{\frac{1}{3}}"},
        sample("exact", "so Answer: 16"),
        {"id": "regex", "question": "A 40s number?", "task": "regex", "answer": r"4\d"},
        {"id": "regex_wrong", "question": "A 40s number?", "task": "regex", "answer": r"4\d"},
    ]
    records[4]["completion"] = "Answer: 42"
    records[5]["completion"] = "Answer: 420"  # fullmatch, not search
    kept, dropped = verify_samples(records)
    assert ids(kept) == ["gsm", "frac_vs_decimal", "exact", "regex"]
    assert reasons(dropped) == {"math_wrong": "wrong_answer", "regex_wrong": "wrong_answer"}

    bad = {"id": "bad", "question": "?", "task": "regex", "answer": "4(", "completion": "4"}
    with pytest.raises(DataError, match=r"record 'bad': answer '4\(' is not a valid regex"):
        verify_samples([bad])


# --- dedup --------------------------------------------------------------------------------------


def test_dedup_exact_and_near_duplicates():
    one_word_changed = LONG_TRACE.replace("regular customer", "loyal customer")
    unrelated = (
        "Let x be the number of apples. Twelve plus nine is twenty one, and a sale of five "
        "leaves sixteen, which we check by adding five back to get twenty one again. Answer: 16"
    )
    records = [
        sample("a", LONG_TRACE, source_id="q"),
        sample("b", "  " + LONG_TRACE.upper() + "\n", source_id="q"),  # case and spaces only
        sample("c", one_word_changed, source_id="q"),
        sample("d", unrelated, source_id="q"),
    ]
    kept, dropped = dedup_samples(records)
    assert ids(kept) == ["a", "d"]
    assert reasons(dropped) == {"b": "duplicate", "c": "near_duplicate"}
    assert [r["duplicate_of"] for r in dropped] == ["a", "a"]

    kept, dropped = dedup_samples(records, near=False)
    assert ids(kept) == ["a", "c", "d"]
    kept, dropped = dedup_samples(records, exact=False, near=False)
    assert ids(kept) == ["a", "b", "c", "d"]


def test_dedup_scope_question_or_all():
    records = [
        sample("q1#0", LONG_TRACE, source_id="q1"),
        sample("q2#0", LONG_TRACE, source_id="q2"),
    ]
    kept, _ = dedup_samples(records)  # default scope: only within a question
    assert ids(kept) == ["q1#0", "q2#0"]
    kept, dropped = dedup_samples(records, scope="all")
    assert ids(kept) == ["q1#0"]
    assert reasons(dropped) == {"q2#0": "duplicate"}


# --- difficulty, select ------------------------------------------------------------------------


def test_difficulty_drops_questions_the_student_solves():
    student = [
        *(sample(f"s1#{i}", f"Answer: {a}", source_id="q1") for i, a in enumerate([16, 16, 16, 3])),
        *(sample(f"s2#{i}", f"Answer: {a}", source_id="q2") for i, a in enumerate([16, 1, 2, 3])),
    ]
    rates = solve_rates(student)
    assert rates == {"q1": 0.75, "q2": 0.25}
    teacher = [
        sample("q1#0", "Answer: 16", source_id="q1"),
        sample("q2#0", "Answer: 16", source_id="q2"),
        sample("q3#0", "Answer: 16", source_id="q3"),  # the student was not sampled on q3
        sample("q1#1", "Answer: 16", source_id="q1"),
    ]
    kept, dropped = drop_solved_by_student(teacher, rates, threshold=0.75)
    assert ids(kept) == ["q2#0", "q3#0"]
    assert reasons(dropped) == {"q1#0": "student_solves", "q1#1": "student_solves"}
    kept, _ = drop_solved_by_student(teacher, rates, threshold=0.8)
    assert len(kept) == 4


def test_select_shortest_keeps_k_per_question_ties_by_id():
    records = [
        sample("q1#0", "x", source_id="q1", completion_tokens=30),
        sample("q1#1", "x", source_id="q1", completion_tokens=10),
        sample("q2#0", "x", source_id="q2", completion_tokens=5),
        sample("q1#2", "x", source_id="q1", completion_tokens=20),
        sample("q1#3", "x", source_id="q1", completion_tokens=10),
    ]
    kept, dropped = select_per_question(records, k=2)
    assert ids(kept) == ["q1#1", "q1#3", "q2#0"]
    assert reasons(dropped) == {"q1#0": "over_k", "q1#2": "over_k"}
    kept, dropped = select_per_question(records, k=None)
    assert ids(kept) == ["q1#1", "q1#3", "q1#2", "q1#0", "q2#0"] and not dropped


def test_select_diverse_is_farthest_first_from_the_shortest():
    base = "add twelve and nine then take away five to get sixteen"
    records = [
        sample("paraphrase", base + " which is the answer", source_id="q"),
        sample("shortest", base, source_id="q"),
        sample(
            "different",
            "count the apples one by one in both of the baskets, then remove the five sold "
            "ones, and the answer is 16",
        ),
        sample("close", base + " so the answer is sixteen", source_id="q"),
    ]
    records[2]["source_id"] = "q"
    kept, dropped = select_per_question(records, k=2, order="diverse")
    assert ids(kept) == ["shortest", "different"]
    assert reasons(dropped) == {"paraphrase": "over_k", "close": "over_k"}
    kept, _ = select_per_question(records, k=2, order="shortest")
    assert ids(kept) == ["shortest", "paraphrase"]
    kept, _ = select_per_question(records, k=None, order="diverse")
    assert ids(kept)[:2] == ["shortest", "different"] and len(kept) == 4
