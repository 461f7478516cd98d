"""Kill/resume: each long command, run as `python -m potstill ...`, is stopped at seeded moments
inside its real work (SIGKILL, and a clean SIGINT or SIGTERM), rerun each time, and must end with
what an uninterrupted run of the same config ends with:

- generate, curate (its rewrite step), teacher cache: the same records (every id once, none lost;
  the same seeded samples, rewrites and cached log-probs);
- sft, distill, rlt train: each rerun continues from the last checkpoint, and every step's logged
  values and the final weights (and rlt train's reference snapshots) equal the uninterrupted
  run's, exactly.

The stops of one case are chained on one output directory (stop, rerun, stop, rerun, ...), so a
rerun also resumes what earlier reruns wrote. Adding a command is one more entry in CASES; the
harness is tests/killing.py.
"""

from __future__ import annotations

import json
import signal

import pytest
from rich.console import Console

from potstill.config import load_config
from potstill.data import read_records, read_shards, write_records

from .conftest import CORPUS
from .curate_samples import LONG_TRACE, sample
from .distill_helpers import distill_overrides, make_teacher_dir, write_data
from .killing import Case, last_checkpoint, run_chain
from .test_generate import _args as generate_args
from .test_sft import _records as sft_records
from .test_sft import _sft_args as sft_args

QUIET = Console(quiet=True)
SAVE_EVERY = 2
"""Training cases checkpoint every 2 steps: a stop between checkpoints loses logged steps, which
the rerun must redo with the same values."""


def sets(args: list[str]) -> list[str]:
    """`verb --set a --set b ...` -> [a, b, ...]"""
    return [value for flag, value in zip(args, args[1:], strict=False) if flag == "--set"]


def without_output_dir(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("run.output_dir=")]


# --- generate -----------------------------------------------------------------------------------


def generate_setup(model_dir, tmp):
    questions = [{"id": f"q{i}", "question": f"{CORPUS[i % 4]} ({i})"} for i in range(16)]
    data = write_records(tmp / "questions.jsonl", questions)
    extra = [
        "--set", "generation.num_samples=2", "--set", "generation.temperature=1.0",
        "--set", "generation.batch_size=4", "--set", "generation.max_new_tokens=16",
    ]  # fmt: skip
    return without_output_dir(sets(generate_args(model_dir, data, tmp / "unused", *extra)))


def generate_reference(overrides):
    from potstill.stages.generate import GenerateConfig, run_generate

    run_generate(load_config(GenerateConfig, overrides=overrides), QUIET)


def samples(out):
    return list(read_shards(out / "samples")) if (out / "samples").is_dir() else []


def count_shards(directory, pattern="part-*.jsonl"):
    return len(list(directory.glob(pattern))) if directory.is_dir() else 0


GENERATE = Case(
    name="generate",
    verb=("generate",),
    setup=generate_setup,
    reference=generate_reference,
    kind="records",
    units=lambda out: count_shards(out / "samples"),  # one shard per batch of 4
    stops=(signal.SIGKILL, signal.SIGINT, signal.SIGKILL),
    partial=samples,
    final=lambda out: sorted(samples(out), key=lambda r: r["id"]),
    progress="generating",
)

# --- curate (the rewrite step is its long, resumable part) --------------------------------------


ROWS = 5 * 64 + 8
"""Rewrites in the curate case: five full shards and a partial one (units 1 to 6: room for a
stop that lands one unit late, on a loaded machine, and two more after it)."""


def curate_setup(model_dir, tmp):
    # One sample per question, all verified and kept: each goes to the rewriting model.
    rows = [
        sample(f"q{i}#0", LONG_TRACE.replace("Monday", f"day {i}"), source_id=f"q{i}")
        for i in range(ROWS)
    ]
    rows += [sample("bad#0", "I do not know.", source_id="bad")]  # dropped: no answer
    data = write_records(tmp / "samples.jsonl", rows)
    prompt = tmp / "restructure.txt"
    prompt.write_text("Rewrite the reasoning as a clean derivation.\n")
    return [
        f"data.source={data}",
        "select.k=null",
        "rewrite.enabled=true",
        f"rewrite.prompt_file={prompt}",
        f"rewrite.model.name={model_dir}",
        "rewrite.max_new_tokens=6",
        "rewrite.temperature=1.0",  # seeded per record: a resumed rewrite is the same text
        "rewrite.batch_size=16",
    ]


def curate_reference(overrides):
    from potstill.stages.curate import CurateConfig, run_curate

    run_curate(load_config(CurateConfig, overrides=overrides), QUIET)


def curate_final(out):
    funnel = json.loads((out / "funnel.json").read_text())
    return read_records(out / "kept.jsonl"), read_records(out / "dropped.jsonl"), funnel


def curate_units(out):
    """1 once the rewrite has started (its shard dir is made before the first request), then one
    more per 64 rewrites on disk: 1 to 6. A unit is no smaller than a shard (64 rewrites, or what
    10 s brought on a slow day), so one flush adds at most one unit and a stop sent at the unit
    after its target still leaves work. (With 32-rewrite units one flush added two, and a stop
    meant for unit 5 of 7 could land after the last full shard, with 8 rewrites left to do.)"""
    rewrite = out / "rewrite"
    if not rewrite.is_dir():
        return 0
    return 1 + sum(p.read_bytes().count(b"\n") for p in rewrite.glob("part-*.jsonl")) // 64


CURATE = Case(
    name="curate",
    verb=("curate",),
    setup=curate_setup,
    reference=curate_reference,
    kind="records",
    units=curate_units,
    stops=(signal.SIGKILL, signal.SIGKILL, signal.SIGTERM),
    partial=lambda out: list(read_shards(out / "rewrite")) if (out / "rewrite").is_dir() else [],
    final=curate_final,
)

# --- teacher cache ------------------------------------------------------------------------------


def cache_setup(model_dir, tmp):
    records = [
        {"id": f"r{i}", "question": CORPUS[i % 4], "solution": " ".join(CORPUS[(i + 1) % 4] * 2)}
        for i in range(32)
    ]
    data = write_records(tmp / "records.jsonl", records)
    return [
        f"teacher.name={model_dir}",
        "teacher.device=cpu",
        f"data.source={data}",
        "data.target_field=solution",
        "data.system_prompt=null",
        "k=8",
        "encoding=u32-f32",  # lossless: the cached values compare exactly
        "max_seq_len=128",
        "batch_size=1",  # every record alone, as in the reference: no padding differences
        "shard_size=4",  # a clean stop has records buffered to flush
    ]


def cache_reference(overrides):
    from potstill.stages.teacher_cache import TeacherCacheConfig, run_teacher_cache

    run_teacher_cache(load_config(TeacherCacheConfig, overrides=overrides), QUIET)


def cached(out):
    from potstill.teacher.cache import open_cache

    if not (out / "meta.json").is_file():
        return []
    cache = open_cache(out)
    rows = []
    for rid in cache.ids():
        top = cache.get(rid)
        rows.append({"id": rid, "ids": top.ids.tolist(), "log_probs": top.log_probs.tolist()})
    return rows


TEACHER_CACHE = Case(
    name="teacher cache",
    verb=("teacher", "cache"),
    setup=cache_setup,
    reference=cache_reference,
    kind="records",
    units=lambda out: count_shards(out, "shard-*.safetensors"),
    stops=(signal.SIGKILL, signal.SIGTERM, signal.SIGKILL),
    partial=cached,
    final=lambda out: sorted(cached(out), key=lambda r: r["id"]),
    progress="teacher cache",
)

# --- sft, distill -------------------------------------------------------------------------------

TRAIN = [f"train.max_steps={8 * SAVE_EVERY}", f"train.save_every={SAVE_EVERY}", "run.log_with=[]"]


def sft_setup(model_dir, tmp):
    data = sft_records(tmp / "kept.jsonl")
    # LoRA dropout 0.1 (from test_sft): the resumed run must restore the RNG too.
    return [*without_output_dir(sets(sft_args(model_dir, data, tmp / "unused"))), *TRAIN]


def sft_reference(overrides):
    from potstill.stages.sft import SFTConfig, run_sft

    run_sft(load_config(SFTConfig, overrides=overrides), QUIET)


def distill_setup(model_dir, tmp):
    teacher = make_teacher_dir(tmp / "teacher")
    data = write_data(tmp / "data.jsonl")
    # balance: a dynamic kd_ratio whose EMAs are trainer state, checkpointed and restored.
    extra = ["loss.kd_ratio.strategy=balance", "train.grad_accum=2", *TRAIN]
    return without_output_dir(distill_overrides(model_dir, teacher, data, tmp / "unused", *extra))


def distill_reference(overrides):
    from potstill.stages.distill import DistillConfig, run_distill

    run_distill(load_config(DistillConfig, overrides=overrides), QUIET)


def checkpoint_units(out):
    return last_checkpoint(out) // SAVE_EVERY


SFT = Case(
    name="sft",
    verb=("sft",),
    setup=sft_setup,
    reference=sft_reference,
    kind="training",
    units=checkpoint_units,
    stops=(signal.SIGKILL, signal.SIGTERM, signal.SIGKILL),
)
DISTILL = Case(
    name="distill",
    verb=("distill",),
    setup=distill_setup,
    reference=distill_reference,
    kind="training",
    units=checkpoint_units,
    stops=(signal.SIGKILL, signal.SIGINT, signal.SIGKILL),
)

# --- rlt train ----------------------------------------------------------------------------------


def rlt_train_setup(model_dir, tmp):
    data = write_records(tmp / "questions.jsonl", RLT_QUESTIONS)
    return [
        f"teacher.name={model_dir}",
        f"student.name={model_dir}",
        f"data.source={data}",
        "grpo.group_size=4",
        "grpo.max_new_tokens=6",
        "grpo.temperature=1.0",  # seeded per (micro-batch, row): a redone step samples the same
        "grpo.ref_sync_every=3",  # out of step with the checkpoints: the resume reloads a reference
        "train.micro_batch_size=2",
        "train.lr=5e-3",
        "tags.explanation_end=t",  # some explanations close, some not: the groups have a signal
        "teacher_system_prompt=null",
        "student_system_prompt=null",
        *TRAIN,
    ]


def rlt_train_reference(overrides):
    from potstill.stages.rlt_train import RLTTrainConfig, run_rlt_train

    run_rlt_train(load_config(RLTTrainConfig, overrides=overrides), QUIET)


RLT_QUESTIONS = [
    {"id": f"q{i}", "question": f"What is {i} + 25?", "solution": f"{i} + 25 = {i + 25}"}
    for i in range(4)
]
RLT_TRAIN = Case(
    name="rlt train",
    verb=("rlt", "train"),
    setup=rlt_train_setup,
    reference=rlt_train_reference,
    kind="training",
    units=checkpoint_units,
    stops=(signal.SIGKILL, signal.SIGTERM, signal.SIGKILL),
)

CASES = [GENERATE, CURATE, TEACHER_CACHE, SFT, DISTILL, RLT_TRAIN]
SLOW = {"curate", "distill", "sft", "teacher cache", "rlt train"}
"""Over ~40 s each: run by CI (the full suite); `generate` stays in the default suite."""


def _params():
    for case in CASES:
        marks = [pytest.mark.slow] if case.name in SLOW else []
        yield pytest.param(case, id=case.name.replace(" ", "-"), marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_stopped_and_rerun_ends_as_an_uninterrupted_run(case, tiny_model_dir, tmp_path):
    run_chain(case, tiny_model_dir, tmp_path)
