"""The stage verbs, registered on the typer app from the one table in `cli.verbs`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from potstill.cli.options import ConfigOpt, ResumeOpt, SetOpt, console
from potstill.cli.verbs import VERBS, Verb, get_verb

ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        metavar="I/N",
        help="Do shard I of N (0-based; records split by a hash of their id) in "
        "OUTPUT_DIR/shards/I-of-N; merge with --merge once all N finished.",
    ),
]
MergeOpt = Annotated[
    bool,
    typer.Option("--merge", help="Merge the finished shards into OUTPUT_DIR (no model loaded)."),
]


def load_stage_config(key: str, path: Path | None, overrides: list[str] | None):
    """The stage's config from a YAML file and `--set` overrides, validated."""
    from potstill.config import load_config, read_yaml

    verb = get_verb(key)
    if path is not None:
        read_yaml(path)  # a missing or broken file fails before the stage (and torch) is imported
    return load_config(verb.config_class(), path, overrides or [])


def run_verb(key: str, path: Path | None, overrides: list[str] | None, **options):
    cfg = load_stage_config(key, path, overrides)  # first: a bad file fails before any import
    return get_verb(key).run_function()(cfg, console, **options)


def _command(verb: Verb):
    """A typer callback with exactly the options the verb's run function takes."""
    key = verb.key
    if "resume" in verb.options:

        def command(config: ConfigOpt = None, set_: SetOpt = None, resume: ResumeOpt = False):
            run_verb(key, config, set_, resume=resume)

    elif "shard" in verb.options:

        def command(
            config: ConfigOpt = None,
            set_: SetOpt = None,
            shard: ShardOpt = None,
            merge: MergeOpt = False,
        ):
            from potstill.data.sharding import parse_shard

            part = parse_shard(shard) if shard is not None else None
            run_verb(key, config, set_, shard=part, merge=merge)

    else:

        def command(config: ConfigOpt = None, set_: SetOpt = None):
            run_verb(key, config, set_)

    return command


def register_stages(app: typer.Typer, groups: dict[str, typer.Typer], custom: set[str]) -> None:
    """One command per row of VERBS; `custom` keys have hand-written commands (extra
    arguments) that still read their row."""
    for verb in VERBS.values():
        if verb.key in custom:
            continue
        *group, name = verb.command
        target = groups[group[0]] if group else app
        target.command(name, help=verb.help)(_command(verb))
