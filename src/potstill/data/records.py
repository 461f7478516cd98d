"""The record schema of DESIGN.md: one JSON object per example; stages add fields, never rename.

Unknown fields are kept as they are (users carry their own metadata through every stage).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

NUMBER = (int, float)


@dataclass(frozen=True)
class FieldSpec:
    types: tuple[type, ...]
    required: bool = False
    doc: str = ""

    def type_names(self) -> str:
        names = {int: "number", float: "number", str: "string", bool: "boolean", dict: "object"}
        return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in self.types))


FIELDS: dict[str, FieldSpec] = {
    "id": FieldSpec((str,), True, "stable, unique; derived from the content when absent"),
    "question": FieldSpec((str,), True, "the prompt the models answer"),
    "solution": FieldSpec((str,), doc="reference answer or worked solution"),
    "answer": FieldSpec((str,), doc="the final answer a verifier checks"),
    "task": FieldSpec((str,), doc="verifier name, e.g. math, rg:gsm_symbolic, exact"),
    "metadata": FieldSpec((dict,), doc="task data a verifier may need (reasoning-gym entries)"),
    "completion": FieldSpec((str,), doc="the teacher's trace"),
    "explanation": FieldSpec((str,), doc="an RLT teacher's explanation"),
    "teacher": FieldSpec((dict,), doc="provenance: model id, sampling args, seed"),
    "rlt_reward": FieldSpec(NUMBER, doc="RLT reward r^SS - lambda r^KL"),
    "r_ss": FieldSpec(NUMBER, doc="RLT student-solution reward"),
    "r_kl": FieldSpec(NUMBER, doc="RLT explanation-naturalness penalty"),
    "verified": FieldSpec((bool,), doc="set by curation"),
    "drop_reason": FieldSpec((str,), doc="why curation dropped it"),
}


def content_id(record: dict) -> str:
    """A stable id from the content, for sources that carry none."""
    text = "\x00".join(str(record.get(k) or "") for k in ("question", "solution", "answer"))
    return "h-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _describe(value) -> str:
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{type(value).__name__} {shown}"


def validate_record(record, where: str) -> tuple[dict | None, list[str]]:
    """Check one raw record; return (normalised record or None, problems).

    `where` locates it for messages, e.g. "data.jsonl:12". Integer ids become strings, a missing
    id is derived from the content; everything else must already have the right type.
    """
    if not isinstance(record, dict):
        return None, [f"{where}: a record must be a JSON object, got {type(record).__name__}"]
    problems = []
    out = dict(record)
    if "id" in out and isinstance(out["id"], int) and not isinstance(out["id"], bool):
        out["id"] = str(out["id"])
    for name, spec in FIELDS.items():
        value = out.get(name)
        if value is None:
            if spec.required and name != "id":
                problems.append(f"{where}: missing required field '{name}'")
            continue
        ok = isinstance(value, spec.types) and not (
            isinstance(value, bool) and bool not in spec.types
        )
        if not ok:
            problems.append(
                f"{where}: field '{name}' must be a {spec.type_names()}, got {_describe(value)}"
            )
        elif spec.required and isinstance(value, str) and not value.strip():
            problems.append(f"{where}: field '{name}' is empty")
    if not problems and out.get("id") is None:
        out["id"] = content_id(out)
    return (None if problems else out), problems
