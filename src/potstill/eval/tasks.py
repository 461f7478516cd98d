"""Held-out tasks: loading them and proving they do not overlap the training questions."""

from __future__ import annotations

from pathlib import Path

from potstill.data import read_records
from potstill.data.verifiers import check_gold
from potstill.errors import ConfigError


def _task_name(source: str) -> str:
    if source.startswith("rg:"):
        return source[3:].partition("?")[0]
    return Path(source.partition("?")[0]).stem or source


def load_tasks(cfg) -> dict[str, list[dict]]:
    """Every task's records, checked: non-empty, gold answers verifiable, none seen in training."""
    tasks = {}
    for task in cfg.tasks:
        records = read_records(task.source, limit=task.limit)
        if not records:
            raise ConfigError(f"tasks: {task.source} holds no records; an eval needs questions")
        check_gold(records, task.source)
        tasks[task.name] = records
    check_no_overlap(tasks, cfg.exclude)
    return tasks


def check_no_overlap(tasks: dict[str, list[dict]], exclude: list[str]) -> None:
    """Refuse an eval whose questions appear (by id or normalised text) in training data."""
    for source in exclude:
        seen = read_records(source)
        ids = {r.get("source_id", r["id"]) for r in seen} | {r["id"].split("#")[0] for r in seen}
        texts = {normal_question(r["question"]) for r in seen}
        for name, records in tasks.items():
            hits = [r for r in records if r["id"] in ids or normal_question(r["question"]) in texts]
            if hits:
                raise ConfigError(
                    f"exclude: {len(hits)} of {len(records)} questions of task '{name}' are in "
                    f"the training data {source} (first: '{hits[0]['id']}'); evaluate on "
                    "held-out questions (another seed, or another split)"
                )


def normal_question(text: str) -> str:
    """Question text compared case- and whitespace-insensitively (held-out checks)."""
    return " ".join(text.lower().split())
