"""YAML in, for config files and `--set` values: safe, fast, and strict about duplicate keys.

PyYAML keeps the last of two equal keys without a word, so `lr: 1e-5` written twice (an edit
merged into an old file) trains with whichever came last. Here the composed node tree is checked
first and a repeat is refused with both places. Dates stay strings: no config field is a date,
and `2024-13-01` would otherwise fail inside the date constructor (ValueError), not as YAML.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from potstill.config.messages import key_name
from potstill.errors import ConfigError

_BASE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml when present: it caps nesting with a clean ScannerError, where the pure-Python parser
recurses into RecursionError (after seconds) on `[[[[...`."""
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(_BASE):
    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in rows if tag != "tag:yaml.org,2002:timestamp"]
        for first, rows in _BASE.yaml_implicit_resolvers.items()
    }


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice: `key` (dotted path), `line` and `column` of the
    repeat (1-based), `first_line` of the first."""

    def __init__(self, key: str, first: yaml.Mark, again: yaml.Mark):
        super().__init__(f"duplicate key '{key}'")
        self.key = key
        self.first_line = first.line + 1
        self.line, self.column = again.line + 1, again.column + 1


def load(text: str):
    """`yaml.safe_load(text)`, refusing duplicate keys (DuplicateKeyError)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        refuse_duplicates(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def refuse_duplicates(root: yaml.Node) -> None:
    """Raise DuplicateKeyError at the first key repeated in one mapping.

    Iterative, and each node visited once: aliases make the tree a graph (`&a [*a]` is a cycle).
    Merge keys (`<<: *base`) are not keys of their own; a key written after one overrides it.
    """
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    visited: set[int] = set()
    while stack:
        node, path = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Mark] = {}
            for key, value in node.value:
                name = path
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE:
                    name = f"{path}.{key_name(key.value)}" if path else key_name(key.value)
                    if (key.tag, key.value) in first:
                        raise DuplicateKeyError(name, first[key.tag, key.value], key.start_mark)
                    first[key.tag, key.value] = key.start_mark
                stack.append((value, name))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    try:
        data = load(text)
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"{path}:{exc.line}:{exc.column}: duplicate key '{exc.key}' (first at line "
            f"{exc.first_line}); YAML would keep only the last one, silently: delete one"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {exc.problem}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: unreadable YAML ({_unreadable(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, not a list")
    return data


def _unreadable(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if "integer string conversion" in str(exc):  # int() refuses more than 4300 digits
        return "an integer too long to read; integers must fit in 64 bits"
    return " ".join(str(exc).split())
