"""`potstill rlt explain`: the teacher explains (question, solution) records; optionally the best
of N explanations per question is kept by RLT reward for a given student.

    potstill rlt explain --config configs/rlt_explain-cpu.yaml [--select best]
    potstill rlt explain --config configs/rlt_explain-cpu.yaml --set engine=ray  # Ray actors

1. Generate N explanations per record through any backend (hf, vllm, openai), resumable: the
   explanations are shards keyed `{record id}#{n}` with seeds from (seed, record id, n), so a
   killed run, rerun, writes only what is missing. With `engine: ray` a pool of Ray actors
   generates and this process writes the same records; explanations that failed every retry are
   listed in `failed.jsonl`, and a rerun generates them.
2. Score (when `select: best` or `score: true`): the RLT reward of each explanation for the
   student, with the teacher's own log-probs (see `rlt.rewards`), always in this process.
3. Write `scored.jsonl` (every explanation with its reward, when scored) and `explained.jsonl`:
   every closed explanation (select all) or the highest-rewarded per question (select best;
   ties go to the lower n). Each record carries `completion`, the student-format text (thought
   = the explanation, then the solution), so `potstill sft` trains on it with
   `data.system_prompt` set to the `student_system_prompt.txt` written beside it.

Selection works on any teacher's explanations: it is the reference code's DataTeacherRewardScorer
as a stage. Explanations the teacher never closed are counted and left out of the output.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from rich.console import Console

from potstill.config import check
from potstill.config.engine import Engine, RayConfig
from potstill.config.sections import BackendConfig, ModelConfig, RunConfig
from potstill.data import ShardWriter, read_records, read_shards, write_records
from potstill.data.seeds import sample_seed
from potstill.fsutil import atomic_write_text
from potstill.rlt.config import KIT_05B, ExplainSampling, RLTDataConfig
from potstill.rlt.data import load_rlt_records
from potstill.rlt.prompts import RLTTags, split_explanation, system_prompt, teacher_request
from potstill.rlt.rewards import RewardConfig
from potstill.rlt.score import check_pair_vocab, mean_and_stderr
from potstill.runs import RunDir
from potstill.teacher.backends import Sampling
from potstill.teacher.ray_pool import import_ray, write_failed
from potstill.teacher.requests import generate_into, generation_progress


@dataclass
class RLTExplainConfig:
    """The teacher writes N explanations per (question, solution); optionally keep the best one
    by RLT reward for a given student; output records are student training data."""

    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(name=KIT_05B))
    """The (trained) teacher: a model spec or a `rlt train` final/ directory."""
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name=KIT_05B))
    """The student the explanations are scored for (select: best, or score: true)."""
    backend: BackendConfig = field(default_factory=BackendConfig)
    data: RLTDataConfig = field(default_factory=RLTDataConfig)
    sampling: ExplainSampling = field(default_factory=ExplainSampling)
    select: Literal["all", "best"] = "all"
    """all: keep every explanation; best: per question the one with the highest RLT reward."""
    score: bool = False
    """Add the RLT reward to every explanation even when select is all."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    reward_batch_size: int = 8
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/rlt_explain"))
    tags: RLTTags = field(default_factory=RLTTags)
    teacher_system_prompt: str | None = "rlt_teacher"
    student_system_prompt: str | None = "rlt_student"
    engine: Engine = "local"
    """local: the teacher generates in this process; ray: in `ray.num_workers` Ray actors, this
    process writing the explanations (the same files) and scoring them (docs/scale_out.md)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """The actor pool of engine: ray."""

    def __post_init__(self):
        check(
            self.reward_batch_size > 0,
            f"reward_batch_size: must be > 0, got {self.reward_batch_size}",
        )


def student_completion(explanation: str, solution: str, tags: RLTTags) -> str:
    """The student's assistant turn: the explanation as its thought, then the solution."""
    return (
        f"{tags.thought_start}{explanation}{tags.thought_end}\n\n"
        f"{tags.solution_start}{solution}{tags.solution_end}"
    )


def _requests(records, cfg: RLTExplainConfig):
    data, system = cfg.data, system_prompt(cfg.teacher_system_prompt, cfg.tags)
    pairs = []
    for record in records:
        rid = str(record["id"])
        base = {"id": rid, "question": record[data.question_field],
                "solution": record[data.solution_field]}  # fmt: skip
        for n in range(cfg.sampling.num_explanations):
            request = teacher_request(
                f"{rid}#{n}", base["question"], base["solution"], tags=cfg.tags, system=system,
                seed=sample_seed(cfg.sampling.seed, rid, n),
            )  # fmt: skip
            pairs.append((request, base))
    return pairs


def _as_explanation(tags: RLTTags):
    def transform(record: dict) -> dict:
        explanation, closed = split_explanation(record.pop("completion"), tags)
        return {**record, "explanation": explanation, "explanation_closed": closed}

    return transform


def select_best(scored: list[dict]) -> list[dict]:
    """Per source record, the explanation with the highest reward (ties: the lower sample n);
    records none of whose explanations has a reward are left out. Input order of first seen."""
    best: dict[str, dict] = {}
    for r in scored:
        if r.get("rlt_reward") is None:
            continue
        key, current = r["source_id"], best.get(r["source_id"])
        rank = (r["rlt_reward"], -r["teacher"]["sample"])
        if current is None or rank > (current["rlt_reward"], -current["teacher"]["sample"]):
            best[key] = r
    return list(best.values())


def run_explain(cfg: RLTExplainConfig, console: Console | None = None) -> dict:
    from potstill.teacher.engines import open_backend

    console = console or Console(stderr=True)
    records = load_rlt_records(cfg.data)
    pairs = _requests(records, cfg)
    needs_scores = cfg.select == "best" or cfg.score
    if needs_scores:
        check_pair_vocab(cfg.teacher, cfg.student)  # before hours of generation
    s = cfg.sampling
    sampling = Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)
    if cfg.engine == "ray":
        import_ray()  # Ray missing: one line, before the run directory is made
    console.print(f"[bold]{len(records)}[/] records × {s.num_explanations} explanations")
    with RunDir(
        cfg.run.output_dir, command="rlt explain", config=cfg, inputs=[cfg.data.source]
    ) as run:
        backend = open_backend(
            cfg.teacher, cfg.backend, cfg.engine, cfg.ray, batch_size=s.batch_size
        )
        try:
            shards = _explain(cfg, run, backend, pairs, sampling, console)
            if cfg.engine == "ray":  # scoring is local: the pool's actors and cluster stop now
                backend.close()
            counts = Counter()
            if failed := write_failed(run.path, getattr(backend, "failed", [])):
                counts["failed"] = failed
                console.print(
                    f"[red]failed[/] {failed} explanations failed every retry (listed in "
                    f"{run.path / 'failed.jsonl'}); rerun to generate them"
                )
            explained = read_shards_sorted(shards)
            if needs_scores:
                explained = _scored_before(run.path / "scored.jsonl", explained)
                if explained is None:  # not scored yet (or the explanations changed since)
                    local = backend if cfg.engine == "local" else None
                    with run.timed("score"):
                        explained = _score(cfg, local, read_shards_sorted(shards), console)
                    write_records(run.path / "scored.jsonl", explained)
        finally:
            backend.close()
        counts.update(closed=sum(r["explanation_closed"] for r in explained))
        counts.update(explanations=len(explained), records=len(records))
        kept = [r for r in explained if r["explanation_closed"] and r["explanation"].strip()]
        if cfg.select == "best":
            kept = select_best(kept)
        for r in kept:
            r["completion"] = student_completion(r["explanation"], r["solution"], cfg.tags)
        out = write_records(run.path / "explained.jsonl", kept)
        student_prompt = system_prompt(cfg.student_system_prompt, cfg.tags) or ""
        atomic_write_text(run.path / "student_system_prompt.txt", student_prompt + "\n")
        counts.update(kept=len(kept))
        rewards = [r["rlt_reward"] for r in explained if r.get("rlt_reward") is not None]
        if rewards:
            counts["mean_reward"], counts["reward_stderr"] = mean_and_stderr(rewards)
            console.print(
                f"mean RLT reward {counts['mean_reward']:.4f} ± {counts['reward_stderr']:.4f} "
                f"(s.e., {len(rewards)} explanations) for {cfg.student.name}"
            )
        run.count(**counts)
    console.print(
        f"[green]done[/] {counts['kept']} explanations → {out} ({counts['closed']} of "
        f"{counts['explanations']} closed); train a student with: potstill sft --set "
        f"data.source={out} --set data.system_prompt={run.path / 'student_system_prompt.txt'}"
    )
    return dict(counts)


def _explain(cfg: RLTExplainConfig, run, backend, pairs, sampling, console):
    """Generate the missing explanations into `{run}/explanations`; returns that directory."""
    s = cfg.sampling
    provenance = {**backend.describe(), "model": cfg.teacher.name,
                  "temperature": s.temperature, "max_new_tokens": s.max_new_tokens}  # fmt: skip
    shards = run.path / "explanations"
    with (
        ShardWriter(shards, shard_size=s.batch_size, flush_seconds=10) as writer,
        generation_progress(console) as progress,
        run.timed("generate"),
    ):
        done = sum(1 for req, _ in pairs if req.key in writer.done_ids)
        bar = progress.add_task("explaining", total=len(pairs), completed=done, speed="")
        generate_into(
            backend, pairs, sampling, writer, provenance,
            on_result=lambda out: progress.update(bar, advance=1),
            transform=_as_explanation(cfg.tags),
        )  # fmt: skip
    return shards


def read_shards_sorted(shards) -> list[dict]:
    return sorted(read_shards(shards), key=lambda r: r["id"])


def _scored_before(path, explained: list[dict]) -> list[dict] | None:
    """The scores a finished earlier run wrote, if they cover exactly these explanations."""
    if not path.is_file():
        return None
    scored = read_records(path)
    same = [(r["id"], r["explanation"]) for r in scored] == [
        (r["id"], r["explanation"]) for r in explained
    ]
    return scored if same else None


def _score(cfg: RLTExplainConfig, backend, explained: list[dict], console) -> list[dict]:
    """The RLT reward of every explanation; the hf backend's teacher is reused, other
    backends' teachers (and engine: ray's, `backend` None) are loaded once here (the reward
    needs their log-probs)."""
    from potstill.rlt.score import load_eval_model, score_records

    if backend is not None and backend.name == "hf":
        teacher = (backend.model.eval(), backend.tokenizer)
    else:
        teacher = load_eval_model(cfg.teacher)
    student = teacher if cfg.student == cfg.teacher else load_eval_model(cfg.student)
    console.print(f"scoring {len(explained)} explanations for {cfg.student.name}")
    return score_records(
        explained, teacher, student, cfg.reward, cfg.reward_batch_size, tags=cfg.tags,
        teacher_system_prompt=cfg.teacher_system_prompt,
        student_system_prompt=cfg.student_system_prompt, source=str(cfg.run.output_dir),
    )  # fmt: skip
