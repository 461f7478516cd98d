"""Typed configs: YAML -> nested dataclasses, `--set a.b=value` overrides, one-line errors.

Each stage's config is a dataclass of small nested dataclasses. Help for a field is the docstring
written under it (litgpt's style): one source, read here with `ast` for `potstill config show`.
Range checks live in each dataclass's `__post_init__` and raise ConfigError with the key's name;
this module adds the dotted path and the file.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

import potstill.config.yamlio as yamlio
from potstill.config.messages import described, key_name, one_line, shown
from potstill.config.yamlio import read_yaml
from potstill.errors import ConfigError
from potstill.redact import redact_data

T = TypeVar("T")
INT_LIMIT = 2**63
"""Integers must fit in 64 bits: torch, numpy and the tokenizers take nothing wider, and a
wider seed or count would fail deep inside a run instead of here."""
_INTEGER = re.compile(r"[-+]?[0-9][0-9_]*")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"a {origin.__name__}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, "null" if tp is type(None) else getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp, key: str):
    """Check `value` against the annotation `tp` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                # A mapping given for a section is that section: its own error (lora.r: 0)
                # says what is wrong, "expected a mapping or null, got dict" would not.
                if isinstance(value, dict) and dataclasses.is_dataclass(arg):
                    raise
                # Likewise a value of the right type: limit: 2**70 is too large, not "not an
                # integer or null".
                if arg in (int, float, str) and _is(value, arg):
                    raise
                continue
        raise _type_error(value, tp, key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        words = [str(a) for a in typing.get_args(tp)]
        close = difflib.get_close_matches(value, words, n=1) if isinstance(value, str) else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key}: {shown(value)} is not {_type_name(tp)}{hint}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(value, tp, key)
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(value, tp, key)
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, tp, key)
        _, item = typing.get_args(tp) or (str, Any)
        out = {}
        for k, v in value.items():
            where = f"{key}.{key_name(k)}"
            out[_text(k if isinstance(k, str) else shown(k), where)] = _convert(v, item, where)
        return out
    if tp is float and _is(value, int):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {shown(value)} is too large for a number") from None
    if tp is float and isinstance(value, str):
        try:  # YAML reads 1e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and _is(value, tp):
        if tp is int and not -INT_LIMIT <= value < INT_LIMIT:
            raise _out_of_range(shown(value), key)
        return _text(value, key) if tp is str else value
    raise _type_error(value, tp, key)


def _is(value, tp) -> bool:
    """isinstance, except that a bool is no number (True would train at lr 1.0)."""
    return isinstance(value, tp) and (tp is bool or not isinstance(value, bool))


def _text(value: str, key: str) -> str:
    """`value`, unless no file can hold it: a NUL ends a path at the OS, and a lone surrogate
    (an escape or an undecodable file name) fails writing the run's resolved config as UTF-8."""
    if "\x00" in value:
        raise ConfigError(f"{key}: {shown(value)} holds a NUL character (\\x00); remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{key}: {shown(value)} holds a lone surrogate ({shown(value[exc.start])[1:-1]} at "
            f"character {exc.start}), which UTF-8 cannot store; fix the \\u escape or the name"
        ) from None
    return value


def _out_of_range(value: str, key: str) -> ConfigError:
    return ConfigError(f"{key}: {value} is out of range; integers must fit in 64 bits")


def _type_error(value, tp, key: str) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {described(value)}")


def from_dict(cls: type[T], data: dict, *, prefix: str = "") -> T:
    """Build `cls` from a plain dict; unknown keys, wrong types and bad values raise ConfigError,
    its message one printable line whatever a check quoted."""
    try:
        return _from_dict(cls, data, prefix)
    except ConfigError as exc:
        if prefix or str(exc) == one_line(str(exc)):
            raise
        raise ConfigError(one_line(str(exc))) from None


def _from_dict(cls: type[T], data: dict, prefix: str) -> T:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping, got {described(data)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1) if isinstance(key, str) else []
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(
                f"{prefix}{key_name(key)}: unknown key; {hint}valid keys here: {', '.join(names)}"
            )
        default = _field_default(fields[key])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            # A section given in part keeps the rest of *this* field's default (SFTConfig's
            # model has LoRA on, ModelConfig's own default has it off), not the section class's.
            value = _deep_merge(to_dict(default), value)
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    try:
        cfg = cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None
    for key in kwargs:  # after the section's own checks, whose messages say more
        _finite(getattr(cfg, key), f"{prefix}{key}")
    return cfg


@functools.cache
def _hints(cls) -> dict:
    """The class's resolved annotations: evaluating them is most of a load's time."""
    return typing.get_type_hints(cls)


def _finite(value, key: str) -> None:
    """Every number in a config is finite: `timeout: .inf` or a NaN weight would pass a range
    check written as `x > 0` or slip past one never written."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _finite(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            _finite(item, f"{key}.{key_name(name)}")


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _deep_merge(merged[key], value)
        merged[key] = value
    return merged


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    """The config as YAML, credentials masked (`potstill.redact`): what `config show` prints
    and a run directory keeps must never hold a key given in a URL."""
    return yaml.safe_dump(redact_data(to_dict(cfg)), sort_keys=False, allow_unicode=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-5` -> (["train", "lr"], 1e-5); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {shown(text)}: expected KEY=VALUE, e.g. --set train.lr=1e-5")
    key = key.strip()
    try:
        value = yamlio.load(raw) if raw.strip() else ""
    except yamlio.DuplicateKeyError as exc:
        message = f"--set {key_name(key)}: duplicate key '{exc.key}' in the value"
        raise ConfigError(message) from None
    except (yaml.YAMLError, ValueError, RecursionError):
        # ValueError: an integer too long for int() (over 4300 digits); RecursionError: nesting
        # too deep for the pure-Python parser. Anything else unreadable stays the text it is.
        if _INTEGER.fullmatch(raw.strip()):
            raise _out_of_range(shown(raw.strip()), key_name(key)) from None
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"--set {key_name(text)}: '{key_name(where)}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults <- YAML file <- `--set` overrides, validated into `cls`."""
    try:
        data = read_yaml(path) if path else {}
        data = apply_overrides(data, list(overrides))
    except ConfigError as exc:
        raise ConfigError(one_line(str(exc))) from None  # a file name may hold a newline
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(one_line(f"{path}: {exc}" if path else str(exc))) from None


def field_help(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, a base class's where the subclass only
    changes the default (empty when there is none)."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__ if isinstance(cls, type) else type(cls).__mro__):
        if dataclasses.is_dataclass(klass):
            helps.update(_own_field_help(klass))
    return helps


def _own_field_help(cls) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    helps = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            helps[node.target.id] = inspect.cleandoc(after.value.value)
    return helps


def describe(cfg, indent: int = 0) -> str:
    """YAML of `cfg` with each field's help as a comment: what `potstill config show` prints."""
    lines = []
    helps = field_help(type(cfg))
    pad = "  " * indent
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in helps:
            lines.extend(f"{pad}# {h}" for h in helps[f.name].splitlines())
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(describe(value, indent + 1))
        else:
            plain = _plain(value)  # lists of sections (eval's models, tasks) as mappings
            dumped = yaml.safe_dump({f.name: plain}, default_flow_style=False, sort_keys=False)
            lines.extend(pad + line for line in dumped.rstrip("\n").splitlines())
    return "\n".join(lines)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def check(condition: bool, message: str) -> None:
    """For `__post_init__`: raise ConfigError(message) unless `condition`."""
    if not condition:
        raise ConfigError(message)
