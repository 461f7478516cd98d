"""Realistic run directories on disk for the report tests: manifests, configs, TensorBoard event
files from the real writer, a funnel.json built by the curate stage's own Funnel, eval.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

PRICE = {"usd_per_hour": 0.10, "hardware": "2-core CPU"}
TEACHER = {
    "label": "teacher",
    "name": "qwen2.5-coder-1.5b-instruct",
    "role": "teacher",
    "cost": {
        "params": 1543714304,
        "disk_bytes": 3087467144,
        "peak_memory_bytes": 6200000000,
        "latency_s": 9.6,
        "tokens_per_s": 14.0,
        "mean_completion_tokens": 134.0,
        "usd_per_1k_answers": 0.267,
    },
}


def student(label: str, latency: float = 3.2) -> dict:
    return {
        "label": label,
        "name": "qwen2.5-coder-0.5b-instruct",
        "role": "student",
        "cost": {
            "params": 494032768,
            "disk_bytes": 988097824,
            "peak_memory_bytes": 2100000000,
            "latency_s": latency,
            "tokens_per_s": 41.0,
            "mean_completion_tokens": 120.5,
            "usd_per_1k_answers": round(latency * 1000 / 3600 * PRICE["usd_per_hour"], 4),
        },
    }


def _flat(model: dict) -> dict:
    return {k: v for k, v in model.items() if k != "cost"} | model["cost"]


def result(model: str, task: str, correct: int, n: int = 40) -> dict:
    acc = correct / n
    return {
        "model": model,
        "task": task,
        "n": n,
        "samples": 1,
        "correct": correct,
        "accuracy": acc,
        "pass@k": {"1": acc},
        "maj@k": {"1": acc},
    }


def make_run(path: Path, command: str, config: dict, *, status="completed", created="", **extra):
    """A run directory as RunDir leaves it: config.yaml, manifest.json, logs/run.log."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    manifest = {
        "command": command,
        "created": created,
        "attempts": [
            {
                "started": created,
                "argv": [command, "--config", f"configs/{command}.yaml"],
                "status": status,
                "finished": created.replace(":00+", ":40+"),
            }
        ],
        "counts": extra.pop("counts", {}),
        "inputs": [],
        "versions": {"python": "3.11.7", "potstill": "0.1.0"},
        "timings": extra.pop("timings", {}),
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (path / "logs").mkdir(exist_ok=True)
    (path / "logs" / "run.log").write_text(f"run started: {command}\n")
    return path


def write_events(run: Path, scalars: dict[str, list[float]]) -> None:
    """TensorBoard scalars under <run>/logs/train, as accelerate's tracker writes them."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "logs" / "train"))
    steps = len(next(iter(scalars.values())))
    for step in range(1, steps + 1):
        for tag, values in scalars.items():
            writer.add_scalar(tag, values[step - 1], step)
    writer.close()


def write_metrics(run: Path, scalars: dict[str, list[float]]) -> None:
    steps = len(next(iter(scalars.values())))
    lines = [
        json.dumps({"step": s, **{k: v[s - 1] for k, v in scalars.items()}})
        for s in range(1, steps + 1)
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def curve(start: float, end: float, steps: int, wobble: float = 0.05) -> list[float]:
    return [
        end + (start - end) * math.exp(-4 * i / steps) + wobble * math.sin(i * 1.7)
        for i in range(steps)
    ]


def funnel_json() -> dict:
    from potstill.curate.funnel import Funnel

    records = [
        {"id": f"q{q}#{s}", "source_id": f"q{q}", "drop_reason": None}
        for q in range(16)
        for s in range(4)
    ]
    funnel = Funnel(input_records=64, input_questions=16)
    truncated = [dict(r, drop_reason="truncated") for r in records[:8]]
    fmt_kept = records[8:]
    funnel.add("format", records, fmt_kept, truncated)
    wrong = [dict(r, drop_reason="wrong_answer") for r in fmt_kept[:15]]
    verified = fmt_kept[15:]
    funnel.add("verify", fmt_kept, verified, wrong)
    best = {r["source_id"]: r for r in verified}
    kept = list(best.values())
    over_k = [dict(r, drop_reason="over_k") for r in verified if r not in kept]
    funnel.add("select", verified, kept, over_k)
    return funnel.to_dict()


def make_pipeline(root: Path) -> Path:
    """A quickstart-like tree: baseline eval, generate, curate, sft, distill, rlt, final eval."""
    tasks = ("gsm_symbolic", "basic_arithmetic")
    base = make_run(
        root / "eval-baseline",
        "eval",
        {"models": ["teacher", "student"], "tasks": list(tasks)},
        created="2026-11-23T01:00:00+00:00",
        timings={"eval": 412.0},
    )
    (base / "eval.json").write_text(
        json.dumps(
            {
                "price": PRICE,
                "models": [TEACHER, student("student (before)")],
                "results": [
                    result("teacher", tasks[0], 26),
                    result("teacher", tasks[1], 34),
                    result("student (before)", tasks[0], 14),
                    result("student (before)", tasks[1], 22),
                ],
            }
        )
    )
    make_run(
        root / "generate",
        "generate",
        {"model": {"name": "qwen2.5-coder-1.5b-instruct"}, "generation": {"num_samples": 4}},
        created="2026-11-23T02:00:00+00:00",
        timings={"generate": 2924.3},
        counts={
            "records": 16,
            "samples": 64,
            "completion_tokens": 12966,
            "truncated": 8,
            "tokens_per_s": 4.43,
        },
    )
    curate = make_run(
        root / "curate",
        "curate",
        {"data": {"source": "generate/samples"}, "select": {"k": 1}},
        created="2026-11-23T03:00:00+00:00",
        timings={"curate": 2.6},
    )
    (curate / "funnel.json").write_text(json.dumps(funnel_json(), indent=2))
    sft = make_run(
        root / "sft",
        "sft",
        {
            "model": {"name": "qwen2.5-coder-0.5b-instruct", "lora": {"r": 16}},
            "train": {"lr": 2e-4, "epochs": 2.0},
        },
        created="2026-11-23T04:00:00+00:00",
        timings={"train": 236.5},
        counts={"steps": 60, "final_loss": 0.12, "target_tokens": 24740},
    )
    loss = curve(0.9, 0.12, 60)
    sft_scalars = {
        "loss": loss,
        "ce": loss,
        "lr": [2e-4 * (1 - i / 60) for i in range(60)],
        "grad_norm": curve(1.5, 0.6, 60, 0.1),
        "tokens_per_s": curve(24, 21, 60, 0.3),
    }
    write_events(sft, sft_scalars)
    write_metrics(sft, sft_scalars)
    distill = make_run(
        root / "distill",
        "distill",
        {
            "student": {"name": "qwen2.5-coder-0.5b-instruct"},
            "loss": {"name": "forward_kl", "kd_ratio": "dynamic"},
            "train": {"lr": 1e-4},
        },
        created="2026-11-23T05:00:00+00:00",
        timings={"train": 1800.0},
        counts={"steps": 120, "final_loss": 0.3},
    )
    write_events(
        distill,
        {
            "loss": curve(1.2, 0.3, 120),
            "ce": curve(0.9, 0.2, 120),
            "kd": curve(1.5, 0.4, 120),
            "kd_ratio": curve(0.3, 0.7, 120, 0.02),
            "lr": [1e-4] * 120,
        },
    )
    rlt = make_run(
        root / "rlt",
        "rlt_train",
        {"teacher": {"name": "qwen2.5-coder-0.5b-instruct"}, "train": {"lr": 1e-6}},
        created="2026-11-23T06:00:00+00:00",
        timings={"train": 3600.0},
        counts={"steps": 50},
    )
    write_events(
        rlt,
        {
            "loss": curve(0.05, 0.01, 50, 0.01),
            "kl": curve(0.0, 0.02, 50, 0.002),
            "reward": curve(-0.9, -0.3, 50, 0.05),
            "reward/r_ss": curve(-0.7, -0.2, 50, 0.04),
            "reward/r_kl": curve(0.06, 0.03, 50, 0.005),
        },
    )
    final = make_run(
        root / "eval-final",
        "eval",
        {"models": ["runs/sft/final"], "tasks": list(tasks)},
        created="2026-11-23T07:00:00+00:00",
        timings={"eval": 130.0},
    )
    (final / "eval.json").write_text(
        json.dumps(
            {
                "price": PRICE,
                # flat cost fields, as `potstill eval` writes them (the baseline nests `cost`)
                "models": [_flat(student("student (after)", latency=3.0))],
                "results": [
                    result("student (after)", tasks[0], 22),
                    result("student (after)", tasks[1], 31),
                ],
            }
        )
    )
    return root


def make_incomplete(root: Path) -> Path:
    """An sft interrupted before logging, a curate without funnel.json, an eval without eval.json;
    one finished generate run that still reports."""
    make_run(
        root / "sft",
        "sft",
        {"train": {"lr": 1e-5}},
        status="interrupted",
        created="2026-11-23T04:00:00+00:00",
        timings={"train": 20.0},
    )
    make_run(root / "curate", "curate", {"select": {"k": 1}}, created="2026-11-23T03:00:00+00:00")
    make_run(
        root / "eval",
        "eval",
        {"tasks": ["gsm_symbolic"]},
        status="failed",
        created="2026-11-23T05:00:00+00:00",
    )
    make_run(
        root / "generate",
        "generate",
        {"model": {"name": "teacher-x"}},
        created="2026-11-23T02:00:00+00:00",
        counts={"samples": 8, "completion_tokens": 900, "truncated": 1},
    )
    return root
