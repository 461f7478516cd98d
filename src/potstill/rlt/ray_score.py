"""`engine: ray` for `rlt score`: the teacher and student forward passes run in a pool of Ray
actors, each loading both models once; the driver cuts the batches exactly as the local engine
does (`score_batches`) and ranks and writes every record itself, so the output holds the local
engine's bytes.

    potstill rlt score --teacher T --student S --in explained.jsonl --out scored.jsonl \\
        --set engine=ray --set ray.num_workers=4
"""

from __future__ import annotations

from potstill.config.engine import RayConfig
from potstill.rlt.prompts import Sample
from potstill.rlt.rewards import RewardConfig, RewardResult, RLTModels, reward_batch
from potstill.rlt.score import (
    RLTScoring,
    check_fields,
    check_pair_vocab,
    load_pair,
    score_batches,
    scored_records,
    scoring_progress,
)
from potstill.teacher.ray_pool import Failed, Pool, PoolWorker


class ScoreWorker(PoolWorker):
    """One Ray actor: the teacher and student, loaded once, scoring batches of (id, sample)."""

    def __init__(self, cfg: RLTScoring):
        teacher, student = load_pair(cfg)
        self.reward: RewardConfig = cfg.reward
        self.models = RLTModels(
            teacher[0], teacher[1], student[0], student[1], cfg.tags,
            cfg.teacher_system_prompt, cfg.student_system_prompt,
        )  # fmt: skip

    def score(self, batch: list[tuple[str, Sample]]) -> list[RewardResult]:
        return reward_batch(self.models, [sample for _, sample in batch], self.reward)


def score_on_ray(
    cfg: RLTScoring, pool_cfg: RayConfig, records: list[dict], source: str, console
) -> tuple[list[dict], list[Failed]]:
    """`records` scored on `pool_cfg.num_workers` actors, in input order as `score_with` returns
    them, and the batches that failed every retry (their records left out of the output)."""
    check_fields(records, source, cfg.fields)
    check_pair_vocab(cfg.teacher, cfg.student)  # tokenizers only, before any actor starts
    samples, batches = score_batches(records, cfg.tags, cfg.fields, cfg.batch_size)
    work = [[(samples[i].id, samples[i]) for i in chunk] for chunk in batches]
    results: list = [None] * len(records)
    failed: list[Failed] = []
    pool = Pool(pool_cfg, ScoreWorker, cfg)
    try:
        with scoring_progress(console, len(records)) as advance:
            for index, result in pool.run("score", work):
                if isinstance(result, Failed):
                    failed.append(result)
                    continue
                for i, one in zip(batches[index], result, strict=True):
                    results[i] = one
                advance(len(batches[index]))
    finally:
        pool.close()
    return scored_records(records, samples, results, cfg.reward), failed
