"""Rephrased held-out sets: the same expressions (so the same gold answers and scorer), in new
words."""

from __future__ import annotations

import pytest

from potstill.data import read_records
from potstill.data.rephrase import number_words, rephrase
from potstill.data.verifiers import score_answer
from potstill.errors import DataError

SOURCE = "rg:basic_arithmetic?min_terms=2&max_terms=4&min_digits=1&max_digits=2&size=6&seed=40000"


@pytest.mark.parametrize(
    ("n", "words"),
    [(0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (77, "seventy-seven"),
     (-8, "negative eight"), (-99, "negative ninety-nine")],
)  # fmt: skip
def test_number_words(n, words):
    assert number_words(n) == words


def test_each_style_keeps_the_answer_and_rewrites_the_question():
    plain = read_records(SOURCE)
    wording = read_records(SOURCE + "&phrasing=wording")
    words = read_records(SOURCE + "&phrasing=words")
    assert (
        [r["answer"] for r in wording]
        == [r["answer"] for r in plain]
        == [r["answer"] for r in words]
    )
    assert plain[2]["question"] == "Calculate 1 - 81 * -16."
    assert wording[2]["question"] == "What number do you get from 1 - 81 * -16?"
    assert words[2]["question"] == (
        "What is one minus eighty-one times negative sixteen? Multiplication and division are "
        "done before addition and subtraction."
    )
    assert words[4]["question"].startswith(
        "What is the negative of (two times negative four) divided by eight?"
    )
    assert [r["id"] for r in words][:2] == [
        "rg-basic_arithmetic-s40000-0-words",
        "rg-basic_arithmetic-s40000-1-words",
    ]
    for record in wording + words:  # reasoning-gym's scorer takes the gold and only the gold
        assert score_answer(record, record["answer"]) == 1.0
        assert score_answer(record, str(int(record["answer"]) + 1)) == 0.0


def test_five_wordings_in_turn():
    questions = [r["question"] for r in read_records(SOURCE + "&phrasing=wording")]
    assert [q.split()[0] for q in questions] == [
        "Work",
        "Evaluate",
        "What",
        "Compute:",
        "Find",
        "Work",
    ]


def test_an_unknown_style_and_a_task_without_expressions_are_refused():
    with pytest.raises(DataError, match=r"phrasing must be one of wording, words, got 'poem'$"):
        read_records(SOURCE + "&phrasing=poem")
    with pytest.raises(DataError, match=r"phrasing needs questions that carry their expression"):
        read_records("rg:fraction_simplification?size=2&seed=1&phrasing=words")


def test_an_expression_it_cannot_read_is_one_line():
    record = {"id": "x", "question": "q", "answer": "1", "metadata": {"expression": "2 ^ 3"}}
    with pytest.raises(DataError, match=r"^spec: cannot phrase the expression '2 \^ 3' in words$"):
        rephrase(record, "words", 0, "spec")
