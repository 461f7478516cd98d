"""`potstill rlt score` through the real CLI on tiny models."""

import json

from potstill.data import write_records

from .conftest import assert_one_line_error, run_cli

ROWS = [
    {
        "id": "a",
        "question": "What is 17 + 25?",
        "solution": "42",
        "explanation": "First add 17 and 25.<|end_of_explanation|>",
    },
    {
        "id": "b",
        "question": "Calculate 5 - 3 - 6.",
        "solution": "-4",
        "explanation": "Subtract",
        "explanation_closed": False,  # the teacher never wrote the closing tag
    },
]


def test_rlt_score_adds_rewards(tiny_model_dir, tmp_path):
    src = write_records(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    proc = run_cli(
        "rlt", "score", "--teacher", str(tiny_model_dir), "--student", str(tiny_model_dir),
        "--in", str(src), "--out", str(out),
        "--set", "teacher_system_prompt=null", "--set", "student_system_prompt=null",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in scored] == ["a", "b"]
    assert all(isinstance(r["rlt_reward"], float) for r in scored)
    assert scored[0]["rlt_reward"] != -1.0
    assert scored[1]["rlt_reward"] == -1.0  # no closing tag: the penalty


def test_rlt_score_names_a_missing_field(tiny_model_dir, tmp_path):
    src = write_records(tmp_path / "in.jsonl", [{"id": "x", "question": "q", "solution": "1"}])
    proc = run_cli(
        "rlt", "score", "--teacher", str(tiny_model_dir), "--student", str(tiny_model_dir),
        "--in", str(src), "--out", str(tmp_path / "out.jsonl"),
    )  # fmt: skip
    assert_one_line_error(proc, "explanation")
    assert not (tmp_path / "out.jsonl").exists()
