"""`potstill rlt score` through the real CLI on tiny models."""

import json

import pytest

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


@pytest.mark.slow
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
    # No closing tag: by default 1 below the lowest closed reward it competes with (no other
    # explanation of its question here, so every closed one scored with it).
    assert scored[1]["rlt_reward"] == pytest.approx(scored[0]["rlt_reward"] - 1.0)


def test_rlt_score_names_a_missing_field(tiny_model_dir, tmp_path):
    src = write_records(tmp_path / "in.jsonl", [{"id": "x", "question": "q", "solution": "1"}])
    proc = run_cli(
        "rlt", "score", "--teacher", str(tiny_model_dir), "--student", str(tiny_model_dir),
        "--in", str(src), "--out", str(tmp_path / "out.jsonl"),
    )  # fmt: skip
    assert_one_line_error(proc, "explanation")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_rlt_score_reads_generate_output_through_the_field_mapping(tiny_model_dir, tmp_path):
    """Any teacher's traces can be scored: `generate` writes `completion` (and keeps the
    record's `answer`), mapped onto explanation and solution."""
    from potstill.data import read_records

    questions = [
        {"id": f"q{i}", "question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(3)
    ]
    src, gen_out = write_records(tmp_path / "q.jsonl", questions), tmp_path / "gen"
    proc = run_cli(
        "generate", "--set", f"model.name={tiny_model_dir}", "--set", f"data.source={src}",
        "--set", "generation.max_new_tokens=6", "--set", "generation.system_prompt=null",
        "--set", "run.log_with=[]", "--set", f"run.output_dir={gen_out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    common = [
        "rlt", "score", "--teacher", str(tiny_model_dir), "--student", str(tiny_model_dir),
        "--in", str(gen_out / "samples"), "--set", "teacher_system_prompt=null",
        "--set", "student_system_prompt=null",
    ]  # fmt: skip
    bad = run_cli(*common, "--out", str(tmp_path / "bad.jsonl"))
    assert_one_line_error(
        bad, "has no text field 'solution' (fields.solution); set fields.solution to the record"
    )
    out = tmp_path / "scored.jsonl"
    proc = run_cli(
        *common, "--out", str(out),
        "--set", "fields.explanation=completion", "--set", "fields.solution=answer",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    scored = {r["id"]: r for r in read_records(out)}
    samples = {r["id"]: r for r in read_records(gen_out / "samples")}
    assert sorted(scored) == sorted(samples) and len(scored) == 3
    for rid, r in scored.items():
        assert isinstance(r["rlt_reward"], float) and r["completion"] == samples[rid]["completion"]
        assert r["explanation_tokens"] > 0 and r["solution_tokens"] > 0
