"""Generated bad input, in process: every verb's config validation, and the record reader.

The cases come from the config dataclasses themselves: each stage's config class is walked with
`dataclasses.fields` and its type hints, and every field (sections included) gets hostile values
(wrong types, 0, negatives, NaN, ±inf, huge ints, bools for numbers, empty and very long strings,
lone surrogates, control characters, lists for scalars, unknown keys), given three ways: as a
Python dict (the API), as a `--set` override and in a YAML file (the CLI). Two outcomes only: a
config whose numbers are finite and fit 64 bits and whose strings UTF-8 can store, or a
ConfigError whose message is one printable line naming the key path. Any other exception (a
TypeError, OverflowError, RecursionError) is a validation bug and fails the test.

Records go the same way through `read_records`: records, or one DataError line naming the file.
Hypothesis runs derandomized and without a database, so CI sees the same cases every time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from potstill.cli.verbs import VERBS
from potstill.config import from_dict, load_config
from potstill.data import read_records
from potstill.errors import ConfigError, DataError, PotstillError

from .config_walk import Leaf, sections, walk

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
"""re.compile warns of "possible nested set" in generated format.require patterns like "[["."""
CLASSES = {key: verb.config_class() for key, verb in VERBS.items()}
INT64 = 2**63


LEAVES = {key: [leaf for _, leaf in walk(cls)] for key, cls in CLASSES.items()}
DISTINCT: dict[str, list[Leaf]] = {key: [] for key in CLASSES}
"""Each (section class, field) once, under the first verb it appears in: TrainConfig.lr is one
check however many verbs have a train section."""
_seen: set = set()
for _key, _cls in CLASSES.items():
    for _owner, _leaf in walk(_cls):
        if (_owner, _leaf.path[-1]) not in _seen or len(_leaf.path) == 1:
            _seen.add((_owner, _leaf.path[-1]))
            DISTINCT[_key].append(_leaf)

HOSTILE = [
    None, True, False, 0, -1, 1, 0.0, -0.0, -1.5, 0.5, 1e-300, math.nan, math.inf, -math.inf,
    2**63, -(2**63) - 1, 10**30, 10**400, 10**5000, "", " ", "\x00", "a\x00b", "\udc80", "\ud800x",
    "a\nb", "\r", "\x1b[31m", "\u2028", "ü→😀", "x" * 20_000, "nan", "-inf", "1e999",
    "1" + "0" * 5000, "a{99999999999}", "(" * 2000, "../..", "rg:", "http://", "%s{0}",
    [], [1], [""], ["a", "b"], [[]], [None], {}, {"x": 1}, {1: 2}, object(), int, Path("x"),
]  # fmt: skip
"""Values every distinct field gets, exhaustively (the regex-shaped ones meet curate's
format.require, `object()` and `int` a repr that would be `<... at 0x...>`)."""
RAW_TEXTS = [
    "", "1" + "0" * 5000, "1e999", ".nan", "-.inf", "[" * 5000, "{a: " * 50 + "}" * 50,
    "!!binary aGk=", "!!python/object:os.system x", "2001-13-45", "2001-01-01", "!!set {a, b}",
    "&a [*a]", "*x", "'", '"\\x', "a: b: c", "\t", "0x7fffffffffffffffff", "0o777", "1_000", "~",
    "{a: 1, a: 2}",
]  # fmt: skip
"""Texts after `KEY=` that YAML reads oddly: huge ints, deep nesting, tags, aliases, dates."""

DRAWABLE = [v for v in HOSTILE if not (isinstance(v, int) and v.bit_length() > 10_000)]
"""HOSTILE less 10**5000: Hypothesis reprs what `data.draw` returns, and that repr raises (the
exhaustive test gives it to every field)."""
text = st.text(st.characters(codec=None, categories=None), max_size=40)
"""Any code point, lone surrogates and control characters included."""
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**500), 10**500),
    st.floats(),
    text,
    st.sampled_from(DRAWABLE),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)


def nested(path: tuple, value) -> dict:
    """{"a": {"b": value}} for ("a", "b"); an int in the path is a one-item list."""
    for part in reversed(path):
        value = [value] if isinstance(part, int) else {part: value}
    return value


def admits_bool(tp) -> bool:
    if tp is bool or tp is Any:
        return True
    return typing.get_origin(tp) in (Union, types.UnionType) and bool in typing.get_args(tp)


def assert_sane(cfg, where: str = "") -> None:
    """An accepted config holds finite numbers that fit 64 bits, and strings UTF-8 can store."""
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            assert_sane(getattr(cfg, f.name), f"{where}.{f.name}")
    elif isinstance(cfg, list | tuple):
        for i, item in enumerate(cfg):
            assert_sane(item, f"{where}[{i}]")
    elif isinstance(cfg, dict):
        for key, item in cfg.items():
            assert_sane(key, f"{where} (a key)")
            assert_sane(item, f"{where}.{key}")
    elif isinstance(cfg, float):
        assert math.isfinite(cfg), f"{where}: accepted {cfg}"
    elif isinstance(cfg, int) and not isinstance(cfg, bool):
        assert -INT64 <= cfg < INT64, f"{where}: accepted an int of {cfg.bit_length()} bits"
    elif isinstance(cfg, str):
        assert "\x00" not in cfg, f"{where}: accepted a NUL character"
        cfg.encode("utf-8")  # a lone surrogate here fails writing the run's resolved config


def assert_clean(message: str, names: tuple[str, ...]) -> None:
    """One printable line, short, naming one of `names`, with no Python object repr in it."""
    assert len(message.splitlines()) == 1, message[:500]
    message.encode("utf-8")  # the CLI prints it: a lone surrogate would crash that print
    assert "<class" not in message and "object at 0x" not in message, message[:500]
    assert len(message) < 1000, f"{len(message)} characters: {message[:300]}"
    assert any(name in message for name in names), (names, message[:500])


def outcome(build, cls, names: tuple[str, ...], *, must_fail: bool = False) -> str | None:
    """Run `build`: a sane config, or a clean ConfigError naming one of `names` (returned).
    Any other exception propagates: that is the bug."""
    try:
        cfg = build()
    except PotstillError as exc:
        assert isinstance(exc, ConfigError), (type(exc), str(exc)[:500])
        assert_clean(str(exc), names)
        return str(exc)
    assert not must_fail, f"accepted: {names}"
    assert isinstance(cfg, cls)
    assert_sane(cfg)
    return None


def names_for(leaf: Leaf) -> tuple[str, ...]:
    """What an error about `leaf` must name: its path, or its section's for a check across the
    section's fields (teacher.lora: the teacher is not trained here)."""
    parent = Leaf(leaf.path[:-1]).dotted
    return (leaf.dotted, parent) if parent else (leaf.dotted,)


PATHS = {"source", "output_dir", "student_samples", "cache", "prompt_file", "exclude", "train"}
PATHS |= {"eval"}  # with "train": quickstart's data.train and data.eval
"""Fields holding a path or a record source: empty, they would mean the current directory."""
POSITIVE = {"alpha", "max_model_len"}
"""Integer counts and sizes that had no check of their own (0 and -1 were accepted)."""


def must_fail(leaf: Leaf, value) -> bool:
    """`value` is wrong for `leaf` whatever the annotation allows: a bool for a number, an empty
    path, a count below 1, a seed outside [0, 2**32)."""
    name = leaf.path[-1]
    if isinstance(value, bool):
        return not admits_bool(leaf.tp)
    if name in PATHS and value in ("", " ", [""]):
        return True
    if isinstance(value, int) and leaf.tp in (int, int | None):
        if name == "seed":
            return not 0 <= value < 2**32
        return name in POSITIVE and value < 1
    return False


def check_dict(cls, leaf: Leaf, value) -> None:
    build = lambda: from_dict(cls, nested(leaf.path, value))  # noqa: E731
    outcome(build, cls, names_for(leaf), must_fail=must_fail(leaf, value))


def check_override(cls, leaf: Leaf, raw: str) -> None:
    outcome(lambda: load_config(cls, overrides=[f"{leaf.dotted}={raw}"]), cls, names_for(leaf))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generated")


@pytest.mark.parametrize("key", list(VERBS))
def test_every_field_survives_every_hostile_value(key):
    """Not sampled: each distinct field x each HOSTILE value as a dict, each RAW_TEXTS override."""
    cls = CLASSES[key]
    for leaf in DISTINCT[key]:
        for value in HOSTILE:
            check_dict(cls, leaf, value)
        for raw in RAW_TEXTS if leaf.overridable else ():
            check_override(cls, leaf, raw)


@pytest.mark.parametrize("key", list(VERBS))
@SETTINGS
@given(data=st.data())
def test_generated_values_as_dict_override_and_file(key, data, scratch):
    cls = CLASSES[key]
    leaf = data.draw(st.sampled_from(LEAVES[key]), label="field")
    value = data.draw(values, label="value")
    check_dict(cls, leaf, value)
    if not leaf.overridable:
        return
    check_override(cls, leaf, data.draw(st.sampled_from(RAW_TEXTS) | text, label="override"))
    try:
        dumped = yaml.safe_dump(nested(leaf.path, value), allow_unicode=data.draw(st.booleans()))
        flow = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    except (yaml.YAMLError, ValueError):
        return  # YAML cannot write it (a 5000-digit int): the dict above covered it
    check_override(cls, leaf, flow.removesuffix("\n...\n").strip())
    path = scratch / "cfg.yaml"
    path.write_bytes(dumped.encode("utf-8", "surrogatepass"))
    # The key, or for text libyaml refuses (a "\ud800" escape) the place: cfg.yaml:3:7.
    places = [f"{path}:{line}:" for line in range(1, dumped.count("\n") + 2)]
    names = (*[f"{path}: {n}" for n in names_for(leaf)], *places)
    outcome(lambda: load_config(cls, path), cls, names)


@pytest.mark.parametrize("key", list(VERBS))
@SETTINGS
@given(data=st.data())
def test_unknown_keys_are_refused_by_their_path(key, data):
    cls = CLASSES[key]
    where, section = data.draw(st.sampled_from(sections(cls)), label="section")
    known = {f.name for f in dataclasses.fields(section)}
    name = data.draw((text | st.integers()).filter(lambda k: k not in known), label="key")
    prefix = where.dotted
    data_ = nested(where.path, {name: 1})  # not nested((..., name)): an int name is no index
    message = outcome(lambda: from_dict(cls, data_), cls, (prefix,))
    assert message is not None and "unknown key" in message, message
    if isinstance(name, str) and name.isprintable() and len(name) < 60:
        assert (f"{prefix}.{name}" if prefix else name) + ": unknown key" in message, message
    if where.overridable and isinstance(name, str):
        dotted = f"{prefix}.{name}" if prefix else name
        outcome(lambda: load_config(cls, overrides=[f"{dotted}=1"]), cls, (prefix,))


# Records: JSONL files through read_records.

PRINTABLE = [v for v in DRAWABLE if isinstance(v, str | float | list | dict | None | bool | int)]
FIELD_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text | st.sampled_from(PRINTABLE),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=5,
)
"""What a record field may hold (only the json-printable HOSTILE values)."""
RECORD_FIELDS = [
    "id", "question", "solution", "answer", "task", "metadata", "completion", "teacher",
    "rlt_reward", "verified", "drop_reason", "mine", "\udc80", "a\nb",
]  # fmt: skip
JUNK = [
    "", "   ", "not json", "[1, 2]", '"a string"', "null", "{", "[" * 100_000, "\ufeff{}",
    '{"question": "q", "id": 1' + "0" * 5000 + "}", '{"question": "q", "rlt_reward": 1e999}',
    '{"question": "q", "r_ss": NaN}', '{"question": "\\udc80"}', '{"question": "q"}' * 2,
    '{"id": "dup", "question": "q"}', '{"id": "dup", "question": "q2"}', "\x00",
    '{"question": "' + "q" * 200_000 + '"}', '{"question": "\\u0000\\u001b[2J\\u2028"}',
]  # fmt: skip
"""Lines json reads oddly: deep nesting, huge ints, NaN, a BOM, two objects on a line, dups."""


records = st.dictionaries(st.sampled_from(RECORD_FIELDS), FIELD_VALUES, max_size=6)


@st.composite
def jsonl_files(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["record", "record", "junk", "bytes"]))
        if kind == "record":
            record = draw(records)
            if draw(st.booleans()):
                record["id"] = draw(st.sampled_from(["dup", "x", 7, "7"]))  # duplicates
            line = json.dumps(record, ensure_ascii=draw(st.booleans()))
            line = line.encode("utf-8", "surrogatepass")
        elif kind == "junk":
            line = draw(st.sampled_from(JUNK)).encode("utf-8", "surrogatepass")
        else:
            line = draw(st.binary(max_size=20))
        lines.append(line.replace(b"\n", b" "))
    return b"\n".join(lines) + b"\n"


def check_records(path: Path) -> None:
    """Records with unique non-empty ids and a question, or a one-line DataError naming the file."""
    try:
        found = read_records(path)
    except PotstillError as exc:
        assert isinstance(exc, DataError), (type(exc), str(exc)[:500])
        assert_clean(str(exc), (str(path),))
        return
    ids = [r["id"] for r in found]
    assert all(isinstance(i, str) and i for i in ids), ids
    assert len(set(ids)) == len(ids), ids
    assert all(isinstance(r["question"], str) and r["question"].strip() for r in found)


@settings(SETTINGS, max_examples=150)
@given(content=jsonl_files())
def test_generated_record_files_give_records_or_one_data_error(content, scratch):
    path = scratch / "records.jsonl"
    path.write_bytes(content)
    check_records(path)


@pytest.mark.parametrize("line", JUNK, ids=range(len(JUNK)))
def test_every_junk_line_gives_records_or_one_data_error(line, tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(line.encode("utf-8", "surrogatepass") + b"\n")
    check_records(path)
