"""The Python API: every stage as a function, with the CLI's validation and errors.

    import potstill as ps

    result = ps.sft({"model": {"name": "qwen2.5-coder-0.5b-instruct"},
                     "data": {"source": "runs/curate/kept.jsonl"}})
    result = ps.distill("configs/distill-cpu.yaml", overrides=["train.max_steps=20"])

A config is the stage's dataclass, a nested dict (keys as in YAML), a YAML path, or None for the
defaults; `overrides` are `--set` strings. Bad input raises `potstill.errors.PotstillError`
(subclasses: ConfigError, DataError, ModelError) with the one-line message the CLI prints.
The functions are made from the verb table (`cli.verbs.VERBS`), so API, CLI and docs cannot
drift apart.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from potstill.cli.verbs import VERBS, Verb


def resolve_config(key: str, config: Any = None, overrides: list[str] | tuple = ()) -> Any:
    """The validated config of stage `key` from a dataclass, dict, YAML path or None."""
    from potstill.config import apply_overrides, from_dict, load_config, to_dict
    from potstill.errors import ConfigError

    cls = VERBS[key].config_class()
    if config is None or isinstance(config, str | Path):
        return load_config(cls, config, list(overrides))
    if isinstance(config, cls):
        config = to_dict(config)
    elif dataclasses.is_dataclass(config):
        raise ConfigError(f"{key}: expected a {cls.__name__}, got a {type(config).__name__}")
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: a config is a {cls.__name__}, a dict or a YAML path")
    return from_dict(cls, apply_overrides(dict(config), list(overrides)))


def _stage_function(verb: Verb):
    def run(config: Any = None, *, overrides: list[str] | tuple = (), console=None, **options):
        cfg = resolve_config(verb.key, config, overrides)
        return verb.run_function()(cfg, console=console, **options)

    run.__name__ = run.__qualname__ = API_NAMES.get(verb.key, verb.key)
    run.__doc__ = (
        f"{verb.help}\n\n`potstill {' '.join(verb.command)}` as a function: "
        f"{verb.config.split(':')[1]} (dataclass, dict, YAML path or None), `overrides` "
        f"(`--set` strings), options {', '.join(verb.options) or 'none'}; returns the run's "
        "counts or result."
    )
    return run


API_NAMES = {"eval": "evaluate", "curate": "curate_samples"}
"""Stage keys whose function has another name: `potstill.eval` and `potstill.curate` are
packages, and importing one of their modules sets that attribute of `potstill`."""
STAGES = {API_NAMES.get(key, key): _stage_function(verb) for key, verb in VERBS.items()}
"""`ps.<name>` for every stage: quickstart, generate, curate_samples, sft, distill,
teacher_cache, evaluate, rlt_score, rlt_warmup, rlt_train, rlt_explain."""
