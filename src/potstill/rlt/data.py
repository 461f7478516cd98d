"""Records for the RLT stages: a question and its solution (and, to warm up, an explanation)."""

from __future__ import annotations

from potstill.data import read_records
from potstill.errors import DataError
from potstill.rlt.config import RLTDataConfig


def load_rlt_records(data: RLTDataConfig, *, explanation: bool = False) -> list[dict]:
    """The records, checked before any model loads: every one has a non-empty question and
    solution (and explanation when asked), named by id when not."""
    records = read_records(data.source, limit=data.limit)
    if not records:
        raise DataError(f"{data.source}: no records; give a source with at least one record")
    fields = [data.question_field, data.solution_field]
    if explanation:
        fields.append(data.explanation_field)
    for i, record in enumerate(records):
        for name in fields:
            value = record.get(name)
            if not isinstance(value, str) or not value.strip():
                what = "has no" if not isinstance(value, str) else "has an empty"
                raise DataError(
                    f"{data.source}: record '{record.get('id', i)}' {what} '{name}' field; RLT "
                    f"needs {', '.join(fields)} in every record (set data.*_field to the "
                    "fields your records use)"
                )
    return records
