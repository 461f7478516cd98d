import pytest

from potstill.data.verifiers import extract_answer, verify


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so the total is \\boxed{12}", "12"),
        ("Answer: \\boxed{-3}", "-3"),
        ("work...\n#### 1234", "1234"),
        ("**Answer:** -61", "-61"),
        ("Answer: 1\n5-3=2, 2-6=-4\nTherefore, the final answer is -4.", "-4"),  # the last wins
        ("17 + 25 equals 42.", "42"),
        ("it costs 1,250 dollars", "1250"),
        ("no numbers here", "no numbers here"),
        ("", ""),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_reasoning_gym_scorer_is_used_for_rg_tasks():
    from potstill.data import read_records

    record = read_records("rg:basic_arithmetic?size=1&seed=1")[0]
    assert verify(record, f"Answer: {record['answer']}") == 1.0
    assert verify(record, "Answer: 123456789") == 0.0


def test_math_verify_accepts_equivalent_forms():
    record = {"question": "half?", "answer": "\\frac{1}{2}", "task": "math"}
    assert verify(record, "The answer is $\\boxed{0.5}$") == 1.0
    assert verify(record, "\\boxed{0.6}") == 0.0


def test_exact_match_by_default():
    assert verify({"question": "q", "answer": " 42 "}, "Answer: 42") == 1.0
    assert verify({"question": "q", "answer": "42"}, "Answer: 41") == 0.0
