"""The methods `potstill compare` trains, each the existing stage underneath: one student per
method and training seed, in its own run directory under `methods/`, every one with the same
optimizer steps (`budget.max_steps`) and batch.

The first seed's students live in `methods/NAME` and are labelled NAME; another seed S in
`methods/NAME-seed-S`, labelled `NAME seed S` (so a run grown by a seed keeps what it had).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from potstill.config import check
from potstill.config.sections import ModelConfig, RunConfig, SFTDataConfig
from potstill.eval.compare import Method
from potstill.rlt.config import ExplainSampling
from potstill.rlt.prompts import RLTTags
from potstill.train.kd_config import DistillTeacherConfig, KDRatioConfig


@dataclass
class CompareRLTConfig:
    """The rlt method: an RLT teacher explains each training question given its answer, the
    explanation that best teaches the student (RLT reward) is kept per question, and the
    student is fine-tuned on it in the paper's student format (thought, then solution)."""

    teacher: ModelConfig | None = None
    """The explaining teacher: a GRPO-trained RLT teacher (`rlt train`'s final/), or null for
    the compare's teacher as it is. It must share the student's vocabulary: the reward reads
    the student's log-probs of the teacher's tokens."""
    sampling: ExplainSampling = field(
        default_factory=lambda: ExplainSampling(num_explanations=4, max_new_tokens=128)
    )
    """Explanations drawn per question (the best by reward is kept), their length and
    temperature."""
    solution_field: str = "answer"
    """The training records' field the teacher is shown as the solution."""
    tags: RLTTags = field(default_factory=RLTTags)
    """The explanation and solution tags (change them only with prompts that name them)."""
    teacher_system_prompt: str | None = "rlt_teacher"
    """The explaining teacher's system prompt (a preset name, a file, text, or null)."""
    student_system_prompt: str | None = "rlt_student"
    """The prompt the reward's student reads the explanation under (its training prompt is
    the compare's, so that every method's student answers alike)."""

    def __post_init__(self):
        check(bool(self.solution_field), "rlt.solution_field: empty; name the answer field")


def train_method(cfg, name: str, seed: int, path: Path, kept: str, console) -> Method:
    """Train one student of method `name` with training seed `seed`; a failure is recorded (and
    reported), not raised."""
    first = seed == cfg.seeds[0]
    out = path / "methods" / (name if first else f"{name}-seed-{seed}")
    label = name if first else f"{name} seed {seed}"
    seeded = replace(cfg, budget=replace(cfg.budget, seed=seed))
    try:
        runs = METHOD_TRAINERS[name](seeded, out, kept, console)
    except Exception as exc:  # noqa: BLE001 - one method's failure must not stop the others
        console.print(f"[red]method {label} failed[/]: {exc}")
        return Method(name, out, [], failed=f"{type(exc).__name__}: {exc}", seed=seed, label=label)
    return Method(name, out, runs, seed=seed, label=label)


def _data(cfg, kept: str) -> SFTDataConfig:
    return SFTDataConfig(source=kept, system_prompt=cfg.decoding.system_prompt)


def _run_cfg(cfg, out: Path) -> RunConfig:
    return RunConfig(output_dir=str(out), log_with=cfg.run.log_with)


def _sft(cfg, out: Path, kept: str, console, steps: int | None = None) -> list[Path]:
    from potstill.stages.sft import SFTConfig, run_sft

    train = replace(cfg.budget, max_steps=steps or cfg.budget.max_steps)
    run_sft(SFTConfig(cfg.student, _data(cfg, kept), train, _run_cfg(cfg, out)), console)
    return [out]


def _logit_soft(cfg, out: Path, kept: str, console) -> list[Path]:
    """The logit method with α = 1: soft targets only, no hard-label term."""
    soft = replace(cfg.loss, kd_ratio=KDRatioConfig(strategy="fixed", value=1.0))
    return _logit(replace(cfg, loss=soft), out, kept, console)


def _logit(cfg, out: Path, kept: str, console) -> list[Path]:
    """Distill from the teacher's top-k cache over the traces; the cache is built once (it does
    not depend on the student's seed) and shared by every logit method and seed. With
    loss.cross_tokenizer it stores each token's text span, which a student with another
    tokenizer aligns with (docs/cross_tokenizer.md)."""
    from potstill.stages.distill import DistillConfig, run_distill
    from potstill.stages.teacher_cache import TeacherCacheConfig, run_teacher_cache

    cache = out.parent.parent / "teacher-cache"
    run_teacher_cache(
        TeacherCacheConfig(
            teacher=replace(cfg.teacher, lora=None), data=_data(cfg, kept), k=cfg.cache_k,
            temperature=cfg.loss.temperature, max_seq_len=cfg.budget.max_seq_len,
            spans=cfg.loss.cross_tokenizer is not None, run=_run_cfg(cfg, cache),
        ),
        console,
    )  # fmt: skip
    teacher = DistillTeacherConfig(model=cfg.teacher, mode="offline", cache=str(cache))
    distill = DistillConfig(cfg.student, teacher, cfg.loss, _data(cfg, kept), cfg.budget)
    run_distill(replace(distill, run=_run_cfg(cfg, out)), console)
    return [cache, out]


def _on_policy(cfg, out: Path, kept: str, console, student=None, steps=None) -> list[Path]:
    from potstill.stages.distill import DistillConfig, run_distill

    teacher = DistillTeacherConfig(model=cfg.teacher, mode="on_policy", on_policy=cfg.on_policy)
    train = replace(cfg.budget, max_steps=steps or cfg.budget.max_steps)
    distill = DistillConfig(
        student or cfg.student, teacher, cfg.on_policy_loss, _data(cfg, kept), train,
        _run_cfg(cfg, out),
    )  # fmt: skip
    run_distill(distill, console)
    return [out]


def _sft_then_on_policy(cfg, out: Path, kept: str, console) -> list[Path]:
    first = cfg.budget.max_steps // 2
    _sft(cfg, out / "sft", kept, console, steps=first)
    student = replace(cfg.student, name=str(out / "sft" / "final"))
    second = cfg.budget.max_steps - first
    _on_policy(cfg, out / "on_policy", kept, console, student=student, steps=second)
    return [out / "sft", out / "on_policy"]


def _rlt(cfg, out: Path, kept: str, console) -> list[Path]:
    """SFT on RLT explanations of the training questions. The explanations do not depend on
    the student's seed, so every seed shares them (`rlt-explain/`). The student trains under
    the compare's training prompt, not RLT's student prompt, so that it answers the held-out
    sets as every other method does; the answer is the last number of its solution tags."""
    from potstill.rlt.config import RLTDataConfig
    from potstill.stages.rlt_explain import RLTExplainConfig, run_explain

    explained = out.parent.parent / "rlt-explain"
    train = out.parent.parent / "data" / "train.jsonl"
    teacher = cfg.rlt.teacher or replace(cfg.teacher, lora=None)
    run_explain(
        RLTExplainConfig(
            teacher=teacher, student=replace(cfg.student, lora=None),
            data=RLTDataConfig(source=str(train), solution_field=cfg.rlt.solution_field),
            sampling=cfg.rlt.sampling, select="best", tags=cfg.rlt.tags,
            teacher_system_prompt=cfg.rlt.teacher_system_prompt,
            student_system_prompt=cfg.rlt.student_system_prompt,
            run=_run_cfg(cfg, explained),
        ),
        console,
    )  # fmt: skip
    _sft(cfg, out, str(explained / "explained.jsonl"), console)
    return [explained, out]


METHOD_TRAINERS = {
    "sft": _sft,
    "logit": _logit,
    "logit_soft": _logit_soft,
    "on_policy": _on_policy,
    "sft_then_on_policy": _sft_then_on_policy,
    "rlt": _rlt,
}
