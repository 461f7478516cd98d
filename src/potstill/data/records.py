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
    "source_id": FieldSpec((str,), doc="the question a sample answers (stages group by it)"),
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


def escaped(text: str) -> str:
    """`text` with lone surrogates as \\uXXXX escapes: safe to print and to encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bad_char(text: str) -> str | None:
    """The first lone surrogate of `text` and where it is, e.g. "\\udc80 at character 3"."""
    if text.isascii():  # the common case, and surrogates are never ASCII
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{escaped(text[exc.start])} at character {exc.start}"
    return None


def _in_value(value, name: str) -> str | None:
    """Where the first lone surrogate inside `value` (the field `name`) is; None if nowhere."""
    if isinstance(value, str):
        bad = _bad_char(value)
        return None if bad is None else f"field '{name}' holds a lone surrogate ({bad})"
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{name}.{escaped(str(key))}" if name else escaped(str(key))
            if isinstance(key, str) and (bad := _bad_char(key)) is not None:
                return f"field '{sub}' has a lone surrogate in its name ({bad})"
            if (found := _in_value(item, sub)) is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if (found := _in_value(item, f"{name}[{i}]")) is not None:
                return found
    return None


def lone_surrogates(record: dict) -> list[str]:
    """One line per field (nested strings and keys included) that holds a lone surrogate.

    A lone surrogate ('\\udc80') is what a JSON `\\udc80` escape or a `surrogateescape` decode
    of bytes leaves; it is no Unicode text, so UTF-8, and with it every shard and output file,
    cannot store it. Checking up front names the record and the field, where writing it would
    fail the whole shard (good records too), again on every rerun.
    """
    # Each field on its own, so that every bad field is reported, not only the first.
    found = (_in_value({key: value}, "") for key, value in record.items())
    return [problem for problem in found if problem is not None]


def validate_record(record, where: str) -> tuple[dict | None, list[str]]:
    """Check one raw record; return (normalised record or None, problems).

    `where` locates it for messages, e.g. "data.jsonl:12". Integer ids become strings, a missing
    id is derived from the content; everything else must already have the right type.
    """
    if not isinstance(record, dict):
        return None, [f"{where}: a record must be a JSON object, got {type(record).__name__}"]
    problems = []
    out = dict(record)
    for name in ("id", "source_id"):
        if name in out and isinstance(out[name], int) and not isinstance(out[name], bool):
            out[name] = str(out[name])
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
    prompt = out["teacher"].get("system_prompt") if isinstance(out.get("teacher"), dict) else None
    if not isinstance(prompt, str | None):  # trainers compare it with data.system_prompt
        problems.append(
            f"{where}: field 'teacher.system_prompt' must be a string or null, got "
            f"{_describe(prompt)}"
        )
    problems.extend(
        f"{where}: {found}, which no UTF-8 file can store: fix the \\u escape or drop the record"
        for found in lone_surrogates(out)
    )
    if not problems and out.get("id") is None:
        out["id"] = content_id(out)
    return (None if problems else out), problems
