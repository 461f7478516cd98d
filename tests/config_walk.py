"""The config dataclasses walked: every field of a stage's config, at its key path, with its
annotation. The generated bad-input suite and the CLI contract test build their cases from it."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class Leaf:
    """One field of a stage config: where it is, ("models", 0, "name"), and its annotation."""

    path: tuple[str | int, ...]
    tp: Any = None

    @property
    def dotted(self) -> str:
        """The key path as the loader names it: models[0].name, train.lr."""
        text = ""
        for part in self.path:
            text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
        return text

    @property
    def overridable(self) -> bool:
        """`--set` cannot index into a list."""
        return all(isinstance(part, str) for part in self.path)


def section_of(tp) -> tuple[type | None, bool]:
    """The dataclass in an annotation (X, X | None, list[X]) and whether it is a list of them."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    if origin in (Union, types.UnionType):
        inner = [a for a in args if dataclasses.is_dataclass(a)]
        return (inner[0] if inner else None), False
    return None, False


def walk(cls, path: tuple = ()):
    """(owner class, Leaf) for every field of `cls`, recursively, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            yield cls, Leaf((*path, f.name), hints[f.name])
            section, is_list = section_of(hints[f.name])
            if section is not None:
                yield from walk(section, (*path, f.name, 0) if is_list else (*path, f.name))


def sections(cls) -> list[tuple[Leaf, type]]:
    """Every place a key can be added, with its class: the root, each section (a list's item)."""
    out = [(Leaf(()), cls)]
    for _, leaf in walk(cls):
        section, is_list = section_of(leaf.tp)
        if section is not None:
            out.append((Leaf((*leaf.path, 0) if is_list else leaf.path), section))
    return out
