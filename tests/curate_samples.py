"""Hand-made teacher samples shared by the curation tests."""

from __future__ import annotations

from collections.abc import Sequence

LONG_TRACE = (
    "First we read the question carefully and write down every quantity it gives us. "
    "The farmer has twelve apples in the first basket and nine apples in the second basket. "
    "Adding the two baskets together gives twenty one apples in total before any are sold. "
    "He then sells five apples at the market on Monday morning to a regular customer. "
    "Subtracting five from twenty one leaves sixteen apples. Answer: 16"
)


def sample(id: str, completion: str, *, source_id: str | None = None, **fields) -> dict:
    """A teacher sample of an exact-match question whose answer is 16."""
    record = {"id": id, "question": "How many apples?", "answer": "16", "task": "exact"}
    record["completion"] = completion
    if source_id is not None:
        record["source_id"] = source_id
    return {**record, **fields}


def ids(records: Sequence[dict]) -> list[str]:
    return [r["id"] for r in records]


def reasons(records: Sequence[dict]) -> dict[str, str]:
    return {r["id"]: r["drop_reason"] for r in records}
