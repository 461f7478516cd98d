import json

import pytest

from potstill.data import read_records, validate_record, write_records
from potstill.data.records import content_id
from potstill.errors import DataError

from .conftest import assert_one_line_error, run_cli


def jsonl(tmp_path, *lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(
        b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n"
    )
    return path


def test_reads_valid_jsonl_and_normalises_ids(tmp_path):
    path = jsonl(
        tmp_path,
        '{"id": 7, "question": "What is 2+2?", "answer": "4", "extra": {"k": 1}}',
        "",
        '{"question": "What is 3+3?", "solution": "3+3=6", "answer": "6"}',
    )
    records = read_records(path)
    assert [r["id"] for r in records] == ["7", content_id(records[1])]
    assert records[0]["extra"] == {"k": 1}  # unknown fields travel through untouched
    assert content_id(records[1]) == content_id(dict(records[1]))  # stable


def test_malformed_line_names_file_and_line(tmp_path):
    path = jsonl(tmp_path, '{"question": "a"}', '{"question": "b",}')
    with pytest.raises(DataError) as exc:
        read_records(path)
    assert str(exc.value).startswith(f"{path}:2: malformed JSON (")


def test_every_schema_problem_is_reported_with_its_place(tmp_path):
    path = jsonl(
        tmp_path,
        '{"id": "a", "answer": "1"}',
        '{"id": "b", "question": 42}',
        '{"id": "c", "question": "ok", "verified": "yes"}',
        "[1, 2]",
    )
    with pytest.raises(DataError) as exc:
        read_records(path)
    assert exc.value.problems == [
        f"{path}:1: missing required field 'question'",
        f"{path}:2: field 'question' must be a string, got int 42",
        f"{path}:3: field 'verified' must be a boolean, got str 'yes'",
        f"{path}:4: a record must be a JSON object, got list",
    ]
    assert str(exc.value) == f"{path}:1: missing required field 'question' (and 3 more problems)"


def test_invalid_utf8_is_located(tmp_path):
    path = jsonl(tmp_path, '{"question": "fine"}', b'{"question": "caf\xe9"}')
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid UTF-8 at byte 17"):
        read_records(path)


def test_duplicate_ids_point_at_both_lines(tmp_path):
    path = jsonl(tmp_path, '{"id": "x", "question": "a"}', '{"id": "x", "question": "b"}')
    with pytest.raises(DataError, match=rf"{path}:2: duplicate id 'x' \(first at {path}:1\)"):
        read_records(path)


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(DataError, match="empty dataset"):
        read_records(jsonl(tmp_path, ""))


def test_bool_is_not_a_number():
    record, problems = validate_record({"question": "q", "rlt_reward": True}, "x:1")
    assert record is None and problems == [
        "x:1: field 'rlt_reward' must be a number, got bool True"
    ]


def test_parquet_round_trip(tmp_path):
    rows = [{"id": f"r{i}", "question": f"q{i}", "answer": str(i)} for i in range(5)]
    path = write_records(tmp_path / "d.parquet", rows)
    assert read_records(path) == rows


def test_datasets_directory(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"id": ["a", "b"], "question": ["q1", "q2"], "answer": ["1", "2"]}
    Dataset.from_dict(rows).save_to_disk(tmp_path / "single")
    assert [r["id"] for r in read_records(tmp_path / "single")] == ["a", "b"]
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)}).save_to_disk(
        tmp_path / "multi"
    )
    with pytest.raises(DataError, match=r"splits train, test; pick one with .*\?split=NAME"):
        read_records(tmp_path / "multi")
    assert len(read_records(f"{tmp_path / 'multi'}?split=test")) == 2


def test_reasoning_gym_spec_maps_answer_and_worked_solution():
    records = read_records("rg:gsm_symbolic?size=3&seed=1")
    assert len(records) == 3
    first = records[0]
    assert first["id"] == "rg-gsm_symbolic-s1-0"
    assert first["task"] == "rg:gsm_symbolic"
    assert first["answer"] == str(first["metadata"]["answer_value"])
    assert first["solution"] == first["metadata"]["answer_cot"] and "step" in first["solution"]
    assert read_records("rg:gsm_symbolic?size=3&seed=1") == records  # seeded: identical again
    json.dumps(records)  # survives any shard format


def test_reasoning_gym_unknown_task():
    with pytest.raises(
        DataError, match="unknown reasoning-gym task 'gsm_symbolc'; did you mean 'gsm_symbolic'"
    ):
        read_records("rg:gsm_symbolc?size=2")


def test_missing_source():
    with pytest.raises(DataError, match="data source not found: /nope/data.jsonl"):
        read_records("/nope/data.jsonl")


def test_cli_data_check(tmp_path):
    good = jsonl(tmp_path, '{"question": "a", "answer": "1"}', name="good.jsonl")
    ok = run_cli("data", "check", str(good))
    assert ok.returncode == 0 and "1 records" in ok.stdout
    bad = jsonl(tmp_path, '{"question": "a"}', "{oops", name="bad.jsonl")
    before = bad.read_bytes()
    assert_one_line_error(run_cli("data", "check", str(bad)), f"{bad}:2: malformed JSON")
    assert bad.read_bytes() == before
    assert_one_line_error(run_cli("data", "check", str(tmp_path / "none.jsonl")), "not found")


def test_a_lone_surrogate_is_a_problem_with_its_place(tmp_path):
    """A `\\udc80` escape reads back as a lone surrogate, which no shard or output file can
    store: validation reports it (it used to pass, then crash the first write; with no id it
    crashed the reader itself, hashing the content for one)."""
    path = jsonl(
        tmp_path,
        '{"id": "a", "question": "caf\\udc80"}',
        '{"question": "q\\ud800", "answer": "1"}',
        '{"id": "c", "question": "ok", "metadata": {"steps": ["x", "y\\udfff"]}}',
        '{"id": "d", "question": "fine \\u00e9 \\ud83d\\ude00"}',
    )
    with pytest.raises(DataError) as exc:
        read_records(path)
    fix = "which no UTF-8 file can store: fix the \\u escape or drop the record"
    assert exc.value.problems == [
        f"{path}:1: field 'question' holds a lone surrogate (\\udc80 at character 3), {fix}",
        f"{path}:2: field 'question' holds a lone surrogate (\\ud800 at character 1), {fix}",
        f"{path}:3: field 'metadata.steps[1]' holds a lone surrogate (\\udfff at character 1), "
        + fix,
    ]  # line 4 is fine: an escaped surrogate pair is one real character
    assert str(exc.value).startswith(f"{path}:1: field 'question' holds a lone surrogate")
    assert str(exc.value).endswith("(and 2 more problems)")


def test_validate_record_reports_every_field_with_a_lone_surrogate():
    record, problems = validate_record(
        {"id": "x\udc80", "question": "q", "note": "n\udc80", "\udc80key": 1}, "x:1"
    )
    assert record is None
    assert [p.split(" (")[0] for p in problems] == [
        "x:1: field 'id' holds a lone surrogate",
        "x:1: field 'note' holds a lone surrogate",
        "x:1: field '\\udc80key' has a lone surrogate in its name",
    ]
    for problem in problems:
        problem.encode("utf-8")  # printable


def test_cli_data_check_reports_a_lone_surrogate(tmp_path):
    bad = jsonl(tmp_path, '{"question": "a"}', '{"question": "b\\udc80"}', name="bad.jsonl")
    assert_one_line_error(
        run_cli("data", "check", str(bad)),
        f"{bad}:2: field 'question' holds a lone surrogate (\\udc80 at character 1)",
    )
