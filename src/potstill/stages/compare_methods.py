"""The methods `potstill compare` trains, each the existing stage underneath: one student per
method and training seed, in its own run directory under `methods/`, every one with the same
optimizer steps (`budget.max_steps`) and batch.

The first seed's students live in `methods/NAME` and are labelled NAME; another seed S in
`methods/NAME-seed-S`, labelled `NAME seed S` (so a run grown by a seed keeps what it had).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from potstill.config.sections import RunConfig, SFTDataConfig
from potstill.eval.compare import Method
from potstill.train.kd_config import DistillTeacherConfig, KDRatioConfig


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
    not depend on the student's seed) and shared by every logit method and seed."""
    from potstill.stages.distill import DistillConfig, run_distill
    from potstill.stages.teacher_cache import TeacherCacheConfig, run_teacher_cache

    cache = out.parent.parent / "teacher-cache"
    run_teacher_cache(
        TeacherCacheConfig(
            teacher=replace(cfg.teacher, lora=None), data=_data(cfg, kept), k=cfg.cache_k,
            temperature=cfg.loss.temperature, max_seq_len=cfg.budget.max_seq_len,
            run=_run_cfg(cfg, cache),
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


METHOD_TRAINERS = {
    "sft": _sft,
    "logit": _logit,
    "logit_soft": _logit_soft,
    "on_policy": _on_policy,
    "sft_then_on_policy": _sft_then_on_policy,
}
