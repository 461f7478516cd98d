"""Configs: typed dataclasses loaded from YAML with `--set` overrides (`loader`), and the
sections the stages share (`sections`: model, LoRA, data, sampling, backend, train, run)."""

from potstill.config.loader import (
    apply_overrides,
    check,
    describe,
    dump_yaml,
    field_help,
    from_dict,
    load_config,
    parse_override,
    read_yaml,
    to_dict,
)
from potstill.config.messages import shown

__all__ = [
    "apply_overrides",
    "check",
    "describe",
    "dump_yaml",
    "field_help",
    "from_dict",
    "load_config",
    "parse_override",
    "read_yaml",
    "shown",
    "to_dict",
]
