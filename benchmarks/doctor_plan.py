"""`potstill doctor --config`'s plan against the measured peaks of real runs of the kit models.

    PYTHONPATH=src python benchmarks/doctor_plan.py [--steps 2] [--seq 64] [--out DIR]
    PYTHONPATH=src python benchmarks/doctor_plan.py --measure-one sft|distill CONFIG

Three configs, each run by the real trainer (`run_sft`, `run_distill`) for a few steps in a fresh
subprocess (so the peak is its own): Qwen2.5-Coder 0.5B LoRA sft; 1.5B → 0.5B distill online
(teacher in bf16); distill offline from a small top-k cache of the 1.5B. The measured peak is
the process's resident set during training (sampled by `eval.cost.MemoryMeter`) above what was
resident before the model loaded; the loader's transient copies are left out (the peak is reset
when training starts). Prints predicted vs measured peak and time per step, and a last line
`RESULT max_abs_err_pct=…`. `--measure-one` is the subprocess's side (one JSON line).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STUDENT, TEACHER = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"


def measure_one(stage: str, config_path: str) -> dict:
    """Run the stage's trainer on its config; the peak RSS above the pre-load baseline."""
    from rich.console import Console

    from potstill.config import load_config
    from potstill.eval.cost import MemoryMeter
    from potstill.stages.distill import DistillConfig, run_distill
    from potstill.stages.sft import SFTConfig, run_sft
    from potstill.train import loop

    config_class, run = (SFTConfig, run_sft) if stage == "sft" else (DistillConfig, run_distill)
    cfg = load_config(config_class, config_path)
    timing = {}

    real_train = loop.train

    def timed_train(**kwargs):
        meter.reset_peak()  # from here on: what training holds, not the loader's copies
        start = time.perf_counter()
        result = real_train(**kwargs)
        timing["seconds"] = time.perf_counter() - start
        return result

    loop.train = timed_train  # fit imports it at call time: `from potstill.train.loop import train`
    with MemoryMeter(interval=0.01) as meter:
        result = run(cfg, Console(stderr=True, quiet=True))
    return {
        "peak_bytes": meter.peak_bytes,
        "seconds_per_step": timing["seconds"] / max(result["step"], 1),
        "steps": result["step"],
    }


def measure(stage: str, config_path: Path, env: dict | None = None, timeout: float = 3600) -> dict:
    """`measure_one` in a fresh process."""
    cmd = [sys.executable, __file__, "--measure-one", stage, str(config_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predict(stage: str, config_path: Path, teacher: str, student: str, throughput: float):
    from potstill.config import load_config
    from potstill.memory_plan import make_plan, model_shape, settings_from_config
    from potstill.models import load_model_config
    from potstill.stages.distill import DistillConfig
    from potstill.stages.sft import SFTConfig

    cfg = load_config(SFTConfig if stage == "sft" else DistillConfig, config_path)
    settings = settings_from_config(cfg, stage, on_gpu=False)
    shapes = [model_shape(load_model_config(spec)) for spec in (teacher, student)]
    return make_plan(
        shapes[1], shapes[0], settings, available=1 << 60, available_source="not checked",
        throughput=throughput, throughput_source="matmul probe",
    ), settings  # fmt: skip


def long_records(path: Path, n: int, words: int) -> Path:
    """Records whose targets outrun max_seq_len, so every sequence is truncated to it (the
    plan's worst case is then the actual case)."""
    from potstill.data import write_records

    rows = [
        {"id": f"r{i}", "question": f"Add {i} and {i + 1}.",
         "completion": " ".join(f"{i} plus {j} is {i + j}." for j in range(words))}
        for i in range(n)
    ]  # fmt: skip
    return write_records(path, rows)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=1))  # JSON is YAML
    return path


def train_section(steps: int, seq: int, batch: int) -> dict:
    return {
        "max_steps": steps, "micro_batch_size": batch, "grad_accum": 1, "max_seq_len": seq,
        "lr": 1e-5, "warmup_ratio": 0.0, "save_every": 1000,
    }  # fmt: skip


def kit_configs(out: Path, steps: int, seq: int, batch: int) -> list[tuple[str, str, Path]]:
    """(name, stage, config) of the three kit runs; the offline cache is built first."""
    data = long_records(out / "records.jsonl", 8, 40)
    lora = {"r": 16, "alpha": 32, "dropout": 0.05}
    common = {"data": {"source": str(data), "system_prompt": None},
              "train": train_section(steps, seq, batch)}  # fmt: skip
    sft = {"model": {"name": STUDENT, "lora": lora}, **common,
           "run": {"output_dir": str(out / "sft"), "log_with": []}}  # fmt: skip
    teacher = {"model": {"name": TEACHER, "dtype": "bfloat16"}}
    online = {"student": {"name": STUDENT, "lora": lora}, "teacher": teacher, **common,
              "run": {"output_dir": str(out / "online"), "log_with": []}}  # fmt: skip
    cache = out / "cache"
    offline = {**online, "teacher": {**teacher, "mode": "offline", "cache": str(cache)},
               "run": {"output_dir": str(out / "offline"), "log_with": []}}  # fmt: skip
    return [
        ("sft LoRA 0.5B", "sft", write_yaml(out / "sft.yaml", sft)),
        ("distill online 1.5B→0.5B", "distill", write_yaml(out / "online.yaml", online)),
        ("distill offline 0.5B", "distill", write_yaml(out / "offline.yaml", offline)),
    ]


def build_cache(out: Path, seq: int) -> None:
    from potstill.config import load_config
    from potstill.stages.teacher_cache import TeacherCacheConfig, run_teacher_cache

    overrides = [
        f"teacher.name={TEACHER}", "teacher.dtype=bfloat16",
        f"data.source={out / 'records.jsonl'}", "data.system_prompt=null",
        f"max_seq_len={seq}", f"run.output_dir={out / 'cache'}", "run.log_with=[]",
    ]  # fmt: skip
    run_teacher_cache(load_config(TeacherCacheConfig, None, overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure-one", nargs=2, metavar=("STAGE", "CONFIG"))
    parser.add_argument("--build-cache", type=Path, metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/potstill-doctor-plan"))
    args = parser.parse_args(argv)
    if args.measure_one:
        print(json.dumps(measure_one(*args.measure_one)))
        return 0
    if args.build_cache:
        build_cache(args.build_cache, args.seq)
        return 0
    from potstill.memory_plan import GIB, measure_throughput

    args.out.mkdir(parents=True, exist_ok=True)
    configs = kit_configs(args.out, args.steps, args.seq, args.batch)
    if not (args.out / "cache").exists():  # in a process of its own: the teacher is freed after
        cmd = [sys.executable, __file__, "--build-cache", str(args.out), "--seq", str(args.seq)]
        subprocess.run(cmd, check=True, capture_output=True)
    throughput = measure_throughput()
    errors = []
    for name, stage, path in configs:
        plan, _ = predict(stage, path, TEACHER, STUDENT, throughput)
        got = measure(stage, path)
        err = 100 * (plan.memory.peak - got["peak_bytes"]) / got["peak_bytes"]
        errors.append(abs(err))
        print(
            f"{name}: peak predicted {plan.memory.peak / GIB:.3f} GiB, measured "
            f"{got['peak_bytes'] / GIB:.3f} GiB ({err:+.1f}%); time/step predicted "
            f"{plan.seconds_per_step:.1f} s, measured {got['seconds_per_step']:.1f} s",
            flush=True,
        )
    print(f"RESULT max_abs_err_pct={max(errors):.1f} configs={len(errors)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
