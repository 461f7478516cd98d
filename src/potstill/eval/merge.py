"""`potstill eval --merge`: join the answers and costs of `potstill eval --shard I/N` runs.

Every shard must hold every answer of its questions (by id, `potstill.data.sharding`); a missing
one is named with the shard to rerun. The merged run directory then looks like an unsharded
eval's: `answers/`, `cost/`, `eval.json`. A model's merged cost weighs each shard by the answers it
gave: seconds per answer and tokens/s over all answers, the highest peak memory, the mean load
time and latency (so it is the cost on the shards' hardware, which should be one kind).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from potstill.data import ShardWriter
from potstill.data.sharding import (
    check_complete,
    copy_records,
    shard_dirs,
    shard_of,
    written_ids,
)
from potstill.errors import ConfigError, DataError
from potstill.eval.cost import price_per_1k_answers
from potstill.fsutil import atomic_write_text
from potstill.runs import RunDir
from potstill.teacher.requests import build_requests


def merge_eval(cfg, tasks: dict[str, list[dict]], console: Console) -> dict:
    from potstill.eval.results import answers_dir, collect_results, print_results, slug

    out = cfg.run.output_dir
    count, dirs = shard_dirs(out)
    if not count:
        raise ConfigError(
            f"--merge: no shards under {out}/shards; run `potstill eval --shard i/n` for each i "
            "first"
        )
    answered: dict[str, dict[int, int]] = {}
    for model in cfg.models:
        for name, records in tasks.items():
            expected: dict[int, set[str]] = {}
            for request, record in build_requests(records, cfg.generation, None):
                expected.setdefault(shard_of(record["id"], count), set()).add(request.key)
            written = {i: written_ids(answers_dir(d, model.label, name)) for i, d in dirs.items()}
            check_complete(out, count, expected, written, f"answers of {model.label} on {name}")
            for i, keys in written.items():
                answered.setdefault(model.label, {}).setdefault(i, 0)
                answered[model.label][i] += len(keys)
    costs = {}
    for model in cfg.models:
        parts = []
        for i, n in sorted(answered[model.label].items()):
            path = dirs[i] / "cost" / f"{slug(model.label)}.json"
            if n and not path.is_file():
                raise DataError(
                    f"merge: shard {i}/{count} answered but has no cost for '{model.label}' "
                    f"(killed before measuring it); rerun `--shard {i}/{count}`, then merge again"
                )
            if n:
                parts.append((n, json.loads(path.read_text())))
        costs[model.label] = {**merged_cost(parts, cfg.cost.usd_per_hour), "shards": count}
    inputs = [t.source for t in cfg.tasks] + list(cfg.exclude)
    with RunDir(out, command="eval", config=cfg, inputs=inputs) as run:
        for model in cfg.models:
            for name in tasks:
                sources = [answers_dir(dirs[i], model.label, name) for i in sorted(dirs)]
                with ShardWriter(answers_dir(run.path, model.label, name), shard_size=1024) as w:
                    copy_records(sources, w)
            cost_path = run.path / "cost" / f"{slug(model.label)}.json"
            cost_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cost_path, json.dumps(costs[model.label], indent=2) + "\n")
        report = collect_results(cfg, run, costs, tasks)
        atomic_write_text(run.path / "eval.json", json.dumps(report, indent=2) + "\n")
        run.count(results=len(report["results"]), shards=count)
    console.print(f"[green]merged[/] {count} shards into {out}")
    print_results(report, console)
    return report


def merged_cost(parts: list[tuple[int, dict]], usd_per_hour: float) -> dict:
    """One model's cost from its shards' (answers, cost) pairs, weighted by answers."""
    answers = sum(n for n, _ in parts)
    seconds = sum(n * c["seconds_per_answer"] for n, c in parts)
    tokens = sum(n * c["mean_completion_tokens"] for n, c in parts)
    latencies = [c["latency_s"] for _, c in parts if c.get("latency_s") is not None]
    per_answer = seconds / max(answers, 1)
    first = parts[0][1]
    return {
        **first,
        "peak_memory_bytes": max((c["peak_memory_bytes"] or 0) for _, c in parts) or None,
        "load_seconds": round(sum(c["load_seconds"] for _, c in parts) / len(parts), 2),
        "seconds_per_answer": round(per_answer, 4),
        "latency_s": round(sum(latencies) / len(latencies), 3) if latencies else None,
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 2),
        "mean_completion_tokens": round(tokens / max(answers, 1), 1),
        "usd_per_1k_answers": round(price_per_1k_answers(per_answer, usd_per_hour), 5),
    }


def import_shard_answers(cfg, run_path: Path, tasks: dict[str, list[dict]], console) -> None:
    """An unsharded eval over a directory with shards: take the answers they already hold."""
    from potstill.eval.results import answers_dir

    dirs = shard_dirs(run_path)[1]
    if not dirs:
        return
    copied = 0
    for model in cfg.models:
        for name, records in tasks.items():
            keys = {req.key for req, _ in build_requests(records, cfg.generation, None)}
            sources = [answers_dir(d, model.label, name) for d in dirs.values()]
            with ShardWriter(answers_dir(run_path, model.label, name), shard_size=1024) as w:
                copied += copy_records(sources, w, keep=keys.__contains__)
    if copied:
        console.print(f"{copied} answers taken from the shards under {run_path}/shards")
