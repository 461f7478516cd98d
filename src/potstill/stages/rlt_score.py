"""`potstill rlt score`: the RLT reward of explanations for a student.

potstill rlt score --teacher T --student S --in explained.jsonl --out scored.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from potstill.data import read_records, write_records
from potstill.rlt.score import (
    RLTScoring,
    check_fields,
    mean_and_stderr,
    score_with,
)


@dataclass
class RLTScoreConfig(RLTScoring):
    """Score explanations with the RLT reward (teacher and student must share a vocabulary)."""


def run_score(
    cfg: RLTScoreConfig, in_path: str | Path, out_path: str | Path, console: Console | None = None
) -> dict:
    """Read records, score them, write them atomically to `out_path`; returns the counts."""
    console = console or Console(stderr=True)
    records = read_records(in_path)
    check_fields(records, str(in_path), cfg.fields)  # before loading two models
    console.print(f"[bold]{len(records)}[/] records from {in_path}")
    scored = score_with(cfg, records, str(in_path), console)
    write_records(out_path, scored)
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
    fixed = cfg.reward.missing_tag_reward
    penalty = "ranked last" if fixed is None else f"reward {fixed}"
    console.print(
        f"scored {stats['scored']} (mean reward {mean:.4f} ± {stderr:.4f} s.e.), "
        f"{stats['unclosed']} without the closing tag ({penalty}), "
        f"{stats['skipped']} skipped as too long → {out_path}"
    )
    return stats
