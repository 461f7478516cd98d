"""`potstill rlt score`: the RLT reward of explanations for a student.

potstill rlt score --teacher T --student S --in explained.jsonl --out scored.jsonl
potstill rlt score ... --set engine=ray --set ray.num_workers=4   # on a pool of Ray actors
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from potstill.config.engine import Engine, RayConfig
from potstill.data import read_records, write_records
from potstill.rlt.score import (
    RLTScoring,
    check_fields,
    mean_and_stderr,
    score_with,
)
from potstill.teacher.ray_pool import import_ray, write_failed


@dataclass
class RLTScoreConfig(RLTScoring):
    """Score explanations with the RLT reward (teacher and student must share a vocabulary)."""

    engine: Engine = "local"
    """local: both models score in this process; ray: in `ray.num_workers` Ray actors, each
    loading both, this process writing the same output (docs/scale_out.md)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """The actor pool of engine: ray."""


def failed_path(out_path: str | Path) -> Path:
    """Where the records whose batch failed every retry on Ray are listed: beside the output,
    `{stem}.failed.jsonl` (not failed.jsonl, which the output's directory may already hold as
    a run directory's own list)."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.failed.jsonl")


def run_score(
    cfg: RLTScoreConfig, in_path: str | Path, out_path: str | Path, console: Console | None = None
) -> dict:
    """Read records, score them, write them atomically to `out_path`; returns the counts. On
    Ray, records whose batch failed every retry are left out and listed in `failed_path`."""
    console = console or Console(stderr=True)
    records = read_records(in_path)
    check_fields(records, str(in_path), cfg.fields)  # before loading two models
    if cfg.engine == "ray":
        import_ray()  # Ray missing: one line, before any model loads
    console.print(f"[bold]{len(records)}[/] records from {in_path}")
    if cfg.engine == "ray":
        from potstill.rlt.ray_score import score_on_ray

        scored, failed = score_on_ray(cfg, cfg.ray, records, str(in_path), console)
    else:
        scored, failed = score_with(cfg, records, str(in_path), console), []
    write_records(out_path, scored)
    listed = failed_path(out_path)
    n_failed = write_failed(listed.parent, failed, name=listed.name)  # or clears an old list
    rewards = [r["rlt_reward"] for r in scored if "rlt_reward" in r]
    mean, stderr = mean_and_stderr(rewards)
    stats = {
        "records": len(scored),
        "scored": len(rewards),
        "skipped": len(scored) - len(rewards),
        "unclosed": sum(1 for r in scored if r.get("explanation_closed") is False),
        "mean_reward": mean,
        "reward_stderr": stderr,
    }
    if n_failed:
        stats["failed"] = n_failed
        console.print(
            f"[red]failed[/] {n_failed} records failed every retry and are not in {out_path} "
            f"(listed in {listed}); rerun to score them"
        )
    fixed = cfg.reward.missing_tag_reward
    penalty = "ranked last" if fixed is None else f"reward {fixed}"
    console.print(
        f"scored {stats['scored']} (mean reward {mean:.4f} ± {stderr:.4f} s.e.), "
        f"{stats['unclosed']} without the closing tag ({penalty}), "
        f"{stats['skipped']} skipped as too long → {out_path}"
    )
    return stats
