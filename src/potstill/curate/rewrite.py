"""Rewrite kept traces with any model, keeping a rewrite only when it still verifies.

    results = rewrite_traces(kept, backend, prompt=Path("prompts/restructure.txt").read_text(),
                             shard_dir=run_dir / "rewrite")

A teacher's raw trace is often rambling (restarts, "wait", repeated checks); restructuring it
into a clean derivation can make it easier to learn from. But a rewriter can also break the
reasoning or change the answer, so each rewritten trace is verified again: if it still verifies it
replaces the completion (the teacher's text stays in `original_completion`), otherwise the
original is kept and `rewrite.status` says why. Nothing is dropped here.

Results go to an append-only shard directory as they arrive, so a killed job resumes where it
stopped: ids already in the shards are not sent to the model again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from potstill.data import ShardWriter, read_shards
from potstill.data.verifiers import verify
from potstill.teacher.backends import Backend, Generation, Request, Sampling

REWRITTEN = "rewritten"
FAILED_VERIFICATION = "rewrite_failed_verification"
TRUNCATED = "rewrite_truncated"


def rewrite_seed(base_seed: int, record_id: str) -> int:
    """A per-record seed from (base seed, id) only, so a resumed job equals an uninterrupted one."""
    digest = hashlib.sha256(f"{base_seed}\0rewrite\0{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def rewrite_request(record: dict, prompt: str, seed: int = 0) -> Request:
    """System = the rewrite instructions, user = the trace to restructure."""
    return Request(
        key=record["id"],
        messages=(
            {"role": "system", "content": prompt},
            {"role": "user", "content": record["completion"]},
        ),
        seed=rewrite_seed(seed, record["id"]),
    )


def apply_rewrite(
    record: dict, generation: Generation, *, rewriter: dict, threshold: float = 1.0
) -> dict:
    """The record with the rewrite when it is complete and still verifies, else the original
    with `rewrite.status` (and the rejected text, for tuning the prompt)."""
    info = {"by": rewriter}
    if generation.finish_reason == "length":
        return {**record, "rewrite": {**info, "status": TRUNCATED, "completion": generation.text}}
    score = verify(record, generation.text)
    if score < threshold:
        status = {"status": FAILED_VERIFICATION, "score": score, "completion": generation.text}
        return {**record, "rewrite": {**info, **status}}
    return {
        **record,
        "completion": generation.text,
        "original_completion": record["completion"],
        "completion_tokens": generation.completion_tokens,
        "finish_reason": generation.finish_reason,
        "score": score,
        "verified": True,
        "rewrite": {
            **info,
            "status": REWRITTEN,
            "original_completion_tokens": record.get("completion_tokens"),
        },
    }


def pending_rewrites(records: Sequence[dict], shard_dir: str | Path) -> list[dict]:
    """The records whose rewrite is not in `shard_dir` yet."""
    shard_dir = Path(shard_dir)
    done = {r["id"] for r in read_shards(shard_dir)} if shard_dir.is_dir() else set()
    return [r for r in records if r["id"] not in done]


def rewrite_traces(
    records: Sequence[dict],
    backend: Backend | None,
    *,
    prompt: str,
    shard_dir: str | Path,
    sampling: Sampling | None = None,
    seed: int = 0,
    threshold: float = 1.0,
) -> list[dict]:
    """Rewrite every record's completion through `backend`; return one result per record, in the
    input order. Results already in `shard_dir` are reused without calling the backend, which
    may be None when every record is done (`pending_rewrites` is empty): no model to load."""
    shard_dir = Path(shard_dir)
    done = {r["id"]: r for r in read_shards(shard_dir)} if shard_dir.is_dir() else {}
    todo = [r for r in records if r["id"] not in done]
    if todo and backend is None:
        raise ValueError(f"{len(todo)} record(s) still need a rewrite, but no backend was given")
    if todo:
        by_id = {r["id"]: r for r in todo}
        requests = [rewrite_request(r, prompt, seed) for r in todo]
        rewriter = backend.describe()
        with ShardWriter(shard_dir, shard_size=64, flush_seconds=10) as writer:
            for request, generation in backend.generate(requests, sampling or Sampling()):
                result = apply_rewrite(
                    by_id[request.key], generation, rewriter=rewriter, threshold=threshold
                )
                writer.write(result)
                done[request.key] = result
    missing = [r["id"] for r in records if r["id"] not in done]
    if missing:
        raise RuntimeError(
            f"the rewrite backend returned no generation for {len(missing)} request(s), e.g. "
            f"'{missing[0]}'; a Backend must yield every request it is given"
        )
    return [done[r["id"]] for r in records]
