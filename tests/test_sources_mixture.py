"""Mixtures of sources (`A + B`): the records of each part in turn, ids unique across parts, and
a run directory that notices when one part changed."""

from __future__ import annotations

import json

import pytest

from potstill.data import read_records
from potstill.errors import DataError
from potstill.run_checks import describe_input


def _jsonl(path, ids):
    path.write_text("".join(json.dumps({"id": i, "question": f"q {i}?"}) + "\n" for i in ids))
    return path


def test_a_mixture_reads_each_part_in_turn(tmp_path):
    local = _jsonl(tmp_path / "local.jsonl", ["a", "b"])
    spec = f"rg:chain_sum?size=3&seed=5 + {local} + rg:products?size=2&seed=7"
    records = read_records(spec)
    assert [r["id"] for r in records] == [
        "rg-chain_sum-s5-0", "rg-chain_sum-s5-1", "rg-chain_sum-s5-2", "a", "b",
        "rg-products-s7-0", "rg-products-s7-1",
    ]  # fmt: skip
    assert [r.get("task") for r in records] == ["rg:chain_sum"] * 3 + [None] * 2 + [
        "rg:products"
    ] * 2
    # The parts read alone give the same records.
    assert records[:3] == read_records("rg:chain_sum?size=3&seed=5")


def test_an_id_in_two_parts_and_an_empty_part_are_refused(tmp_path):
    one = _jsonl(tmp_path / "one.jsonl", ["a", "b"])
    two = _jsonl(tmp_path / "two.jsonl", ["c", "b"])
    with pytest.raises(DataError) as refused:
        read_records(f"{one} + {two}")
    assert str(refused.value) == f"{two}:2: duplicate id 'b' (first at {one}:2)"
    with pytest.raises(DataError) as empty:
        read_records(f"{one} +  + {two}")
    assert (
        str(empty.value) == f"{one} +  + {two}: a mixture has an empty part; write SOURCE + SOURCE"
    )


def test_a_path_with_a_plus_in_its_name_is_one_source(tmp_path):
    odd = _jsonl(tmp_path / "a + b.jsonl", ["x"])
    assert [r["id"] for r in read_records(str(odd))] == ["x"]


def test_a_mixture_changes_when_one_part_does(tmp_path):
    part = _jsonl(tmp_path / "part.jsonl", ["a"])
    spec = f"rg:chain_sum?size=2&seed=1 + {part}"
    before = describe_input(spec)
    assert describe_input(spec) == before
    _jsonl(part, ["a", "b"])
    after = describe_input(spec)
    assert after["spec"] == spec and after["sha256"] != before["sha256"]
