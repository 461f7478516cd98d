"""Benchmark: online logit-distillation training steps on the real pair, potstill vs TRL 1.16.

    python benchmarks/kd_step.py                      # 2 sequences x <= 160 tokens, 2 timed steps
    python benchmarks/kd_step.py --steps 1 --seqs 1 --set loss.chunk_size=32   # potstill rows

Teacher qwen2.5-coder-1.5b-instruct, student qwen2.5-coder-0.5b-instruct with LoRA (r 16, all
linear layers), both fp32 on CPU, from the offline kit. Further potstill rows: the teacher in
bf16 (stored and computed; the loss upcasts its logits), the teacher and the student's frozen
base in bf16 (PEFT keeps the LoRA adapters fp32), and the teacher's linear weights stored bf16
but computed in fp32 (`teacher.storage_dtype`, for CPUs without fast bf16 math). TRL runs as
shipped, fp32, so with gradient checkpointing on (its configs' default; ours is off: `--set
train.gradient_checkpointing=true` matches it). Every trainer sees the same sequences
(gsm_symbolic question -> worked solution, `build_example`): a step is `--seqs` micro-batches
of one sequence (no padding: the same tokens for every trainer). Objective: off-policy forward
KL, T = 1, no hard loss (TRL: lmbda = 0, beta = 0; ours: kd_ratio 1, forward_kl).

- potstill: `train.loop.train` with the distill loss (`chunked_kd_loss`, `TeacherHidden`); the
  bf16 rows also report their first step's loss against the fp32 row's (same weights, same
  sequences: `bf16_*_loss_diff`, `bf16_*_loss_rel_diff`).
- TRL `DistillationTrainer`: no off-policy mode in 1.16 (it always samples), so its `_generate`
  is replaced by a lookup of the same completions; the rest of its step runs as shipped. That
  favours it: no sampling time is counted.
- TRL `GKDTrainer` (experimental), lmbda = 0, beta = 0 (full logits), the same tensors.

Each trainer runs in a fresh process; time is the steps after one warm-up. The CPU is shared, so
`speedup` compares tokens per CPU-second the process got (times its threads); wall-clock
tokens/s and CPU share are printed too (`wall_speedup`). Memory: peak RSS from after both models
are loaded to the end of training (reset through /proc/self/clear_refs). `weights`: both models'
tensors before LoRA; `above`: the peak less them (bf16 weights are mapped from the kit's
safetensors and counted once read). Ends with `RESULT speedup=… mem_ratio=…` against the better
TRL trainer on each axis, then `bf16_teacher_…`, `bf16_base_…`, `bf16_storage_…` likewise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEACHER, STUDENT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
TRAINERS = {
    "potstill": "potstill distill (online, fused chunked loss)",
    "potstill_bf16_teacher": "potstill distill, teacher bf16",
    "potstill_bf16_base": "potstill distill, teacher + student base bf16, LoRA fp32",
    "potstill_bf16_storage": "potstill distill, teacher stored bf16, computed fp32",
    "trl_distill": "TRL 1.16 DistillationTrainer (chunked, off-policy via lookup)",
    "trl_gkd": "TRL 1.16 GKDTrainer (lmbda=0, beta=0)",
}
DTYPES = {"potstill_bf16_teacher": ("bfloat16", "float32"), "potstill_bf16_base": ("bfloat16",) * 2}
"""(teacher, student) weight dtypes where not fp32 (bf16: stored and computed in bf16)."""
BF16_ROWS = {
    "potstill_bf16_teacher": "bf16_teacher",
    "potstill_bf16_base": "bf16_base",
    "potstill_bf16_storage": "bf16_storage",
}
"""bf16 settings -> their RESULT key prefix."""
LR, LORA = 1e-4, {"r": 16, "alpha": 32, "dropout": 0.0}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def build_items(tokenizer, seqs: int, max_len: int):
    from potstill.data import read_records
    from potstill.data.examples import build_example
    from potstill.train.kd import Item

    items = []
    for record in read_records(f"rg:gsm_symbolic?size={4 * seqs}&seed=7"):
        messages = ({"role": "user", "content": record["question"]},)
        ex = build_example(tokenizer, messages, record["solution"], max_len)
        if ex is not None and ex.target_tokens >= max_len // 4:
            items.append(Item(ex, str(record["id"]), messages))
        if len(items) == seqs:
            return items
    raise SystemExit("not enough records with target tokens; raise --max-seq-len")


def _split(item):
    """(prompt ids, completion ids) of an item: the completion starts at its first label."""
    start = next(i for i, label in enumerate(item.example.labels) if label != -100)
    return item.example.input_ids[:start], item.example.input_ids[start:]


class StepClock:
    """Wall-clock and process CPU time at the end of every optimizer step."""

    def __init__(self):
        self.ends: list[tuple[float, float]] = []
        self.losses: list[float] = []

    def tick(self, loss: float | None = None) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))
        if loss is not None:
            self.losses.append(loss)

    def timed(self, warmup: int = 1) -> tuple[float, float]:
        """(wall seconds, CPU seconds over all threads) of the steps after the warm-up."""
        (w0, c0), (w1, c1) = self.ends[warmup - 1], self.ends[-1]
        return w1 - w0, c1 - c0


def run_potstill(student, teacher, tokenizer, items, args, clock: StepClock, out: str):
    from rich.console import Console

    from potstill.config import load_config
    from potstill.config.sections import LoraConfig
    from potstill.data.examples import count_tokens
    from potstill.models import apply_lora
    from potstill.runs import RunDir
    from potstill.stages.distill import DistillConfig
    from potstill.train.kd import DistillHooks, collate_items, make_loss_fn, online_teacher
    from potstill.train.loop import train

    cfg = load_config(
        DistillConfig,
        overrides=[
            "loss.kd_ratio.value=1.0",
            f"train.lr={LR}",
            "train.lr_schedule=constant",
            "train.warmup_ratio=0.0",
            "train.micro_batch_size=1",
            f"train.grad_accum={len(items)}",
            f"train.max_steps={args.steps + 1}",
            f"train.max_seq_len={args.max_seq_len}",
            "train.save_every=1000000",
            "run.log_with=[]",
            *args.set,
        ],
    )

    class Hooks(DistillHooks):
        def after_step(self, step, logged):
            clock.tick(logged["loss"])

    student = apply_lora(student, LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=0.0))
    hooks = Hooks(cfg, tokenizer)
    with RunDir(out, command="bench", config=cfg) as run:
        train(
            cfg=cfg.train,
            model=student,
            examples=items,
            collate=lambda batch: collate_items(batch, tokenizer.pad_token_id),
            count_tokens=count_tokens,
            loss_fn=make_loss_fn(cfg, online_teacher(teacher), hooks),
            run=run,
            log_with=[],
            console=Console(quiet=True),
            hooks=hooks,
        )


def _trl_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return Clock()


def _common_args(args, n: int, out: str) -> dict:
    return {
        "output_dir": out,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": n,
        "max_steps": args.steps + 1,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "logging_steps": 1000,
        "save_strategy": "no",
        "report_to": [],
        "bf16": False,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def _peft_config():
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip


def run_trl_distill(student, teacher, tokenizer, items, args, clock: StepClock, out: str):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    by_prompt = {tokenizer.decode(_split(it)[0]): _split(it) for it in items}

    class SameBatches(DistillationTrainer):
        # 1.16 always samples completions; hand it the dataset's instead (same batches as ours).
        def _generate(self, prompts):
            pairs = [by_prompt[p] for p in prompts]
            return [p for p, _ in pairs], [c for _, c in pairs], None, None, []

    config = DistillationConfig(
        **_common_args(args, len(items), out),
        beta=0.0,
        temperature=1.0,
        max_completion_length=args.max_seq_len,
        disable_dropout=True,
    )
    tokenizer.padding_side = "left"
    trainer = SameBatches(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": list(by_prompt)}),
        processing_class=tokenizer,
        callbacks=[_trl_callback(clock)],
        peft_config=_peft_config(),
    )
    trainer.train()


def run_trl_gkd(student, teacher, tokenizer, items, args, clock: StepClock, out: str):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from potstill.data.examples import collate

    def collator(rows):
        batch = collate([items[r["idx"]].example for r in rows], tokenizer.pad_token_id)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    config = GKDConfig(
        **_common_args(args, len(items), out),
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        seq_kd=False,
        max_length=args.max_seq_len,
        disable_dropout=True,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        data_collator=collator,
        train_dataset=Dataset.from_dict({"idx": list(range(len(items)))}),
        processing_class=tokenizer,
        callbacks=[_trl_callback(clock)],
        peft_config=_peft_config(),
    )
    trainer.train()


def worker(name: str, args) -> dict:
    import torch

    from potstill.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.student)
    items = build_items(tokenizer, args.seqs, args.max_seq_len)
    teacher_dtype, student_dtype = DTYPES.get(name, ("float32", "float32"))
    storage = name == "potstill_bf16_storage"  # loaded as saved (bf16), then narrow_storage
    teacher = load_model(args.teacher, dtype="bfloat16" if storage else teacher_dtype, device="cpu")
    teacher.eval().requires_grad_(False)
    if storage:
        from potstill.train.frozen_storage import narrow_storage

        narrow_storage(teacher, torch.bfloat16, torch.float32)
    student = load_model(args.student, dtype=student_dtype, device="cpu")
    loaded_kib = _status_kib("VmRSS")
    weights = sum(t.nbytes for m in (teacher, student) for t in (*m.parameters(), *m.buffers()))
    _reset_peak()
    clock = StepClock()
    runner = {"trl_distill": run_trl_distill, "trl_gkd": run_trl_gkd}.get(name, run_potstill)
    with tempfile.TemporaryDirectory() as out:
        runner(student, teacher, tokenizer, items, args, clock, out)
    if len(clock.ends) != args.steps + 1:
        raise RuntimeError(f"{name}: {len(clock.ends)} steps timed, expected {args.steps + 1}")
    tokens = args.steps * sum(sum(lb != -100 for lb in it.example.labels[1:]) for it in items)
    seconds, cpu_seconds = clock.timed()
    threads = torch.get_num_threads()
    return {
        "tokens_per_s": tokens / seconds,
        # Contention-proof: the same tokens over the CPU time the process got, at its threads.
        "tokens_per_cpu_s": tokens * threads / cpu_seconds,
        "step_s": seconds / args.steps,
        "cpu_share": cpu_seconds / (seconds * threads),
        "peak_mib": _status_kib("VmHWM") / 1024,
        "models_mib": loaded_kib / 1024,
        "weights_mib": weights / 2**20,
        "tokens_per_step": tokens // args.steps,
        # The first step: the same weights and sequences in every potstill setting.
        "first_loss": clock.losses[0] if clock.losses else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    parser.add_argument("--seqs", type=int, default=2, help="sequences per optimizer step")
    parser.add_argument("--max-seq-len", type=int, default=160)
    parser.add_argument("--only", choices=list(TRAINERS), action="append")
    parser.add_argument("--set", action="append", default=[], help="potstill config override")
    parser.add_argument("--teacher", default=TEACHER, help="model spec (kit name by default)")
    parser.add_argument("--student", default=STUDENT, help="model spec (kit name by default)")
    parser.add_argument("--worker", choices=list(TRAINERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("WORKER " + json.dumps(worker(args.worker, args)), flush=True)
        return
    if args.set:  # a bad override: one line here, not a traceback from every potstill row
        from potstill.config import load_config
        from potstill.errors import PotstillError
        from potstill.stages.distill import DistillConfig

        try:
            load_config(DistillConfig, overrides=args.set)
        except PotstillError as error:
            parser.error(f"--set: {error}")
    results = {}
    for name in args.only or TRAINERS:
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps)]
        cmd += ["--seqs", str(args.seqs), "--max-seq-len", str(args.max_seq_len)]
        cmd += ["--teacher", args.teacher, "--student", args.student]
        cmd += [f"--set={override}" for override in args.set]
        start = time.perf_counter()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER ")]
        if proc.returncode != 0 or not lines:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(lines[-1][7:])
        print(f"{name}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"\n{args.seqs} sequences x <= {args.max_seq_len} tokens per step, {args.steps} steps")
    print_table(results)
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in figures(results).items()))


def print_table(results: dict) -> None:
    head = ("tok/s cpu", "tok/s wall", "cpu share", "s/step", "peak MiB", "weights", "above")
    print(f"{'trainer':<62} " + " ".join(f"{h:>10}" for h in head + ("loss 1",)))
    for name, r in results.items():
        cells = (r["tokens_per_cpu_s"], r["tokens_per_s"], r["cpu_share"], r["step_s"])
        loss = "" if r["first_loss"] is None else f"{r['first_loss']:.6f}"
        print(
            f"{TRAINERS[name]:<62} "
            + " ".join(f"{c:>10.2f}" for c in cells)
            + f" {r['peak_mib']:>10.0f} {r['weights_mib']:>10.0f}"
            + f" {r['peak_mib'] - r['weights_mib']:>10.0f} {loss:>10}"
        )


def figures(results: dict) -> dict[str, float]:
    """RESULT's figures: potstill (fp32, then each bf16 setting) against the better TRL trainer
    on each axis; a bf16 setting's first-step loss against the fp32 one's."""
    ours = results.get("potstill")
    trl = [results[n] for n in ("trl_distill", "trl_gkd") if n in results]
    if ours is None or not trl:
        raise SystemExit("RESULT missing: a trainer failed")
    best_speed = max(r["tokens_per_cpu_s"] for r in trl)
    least_mem = min(r["peak_mib"] for r in trl)
    out = {
        "speedup": ours["tokens_per_cpu_s"] / best_speed,
        "mem_ratio": ours["peak_mib"] / least_mem,
        "wall_speedup": ours["tokens_per_s"] / max(r["tokens_per_s"] for r in trl),
    }
    for name in ("trl_distill", "trl_gkd"):
        if name in results:
            other = results[name]
            out[f"speedup_vs_{name}"] = ours["tokens_per_cpu_s"] / other["tokens_per_cpu_s"]
            out[f"mem_ratio_vs_{name}"] = ours["peak_mib"] / other["peak_mib"]
    for name, key in BF16_ROWS.items():
        if name in results:
            row, diff = results[name], results[name]["first_loss"] - ours["first_loss"]
            out[f"{key}_speedup"] = row["tokens_per_cpu_s"] / best_speed
            out[f"{key}_mem_ratio"] = row["peak_mib"] / least_mem
            out[f"{key}_loss_diff"] = diff
            out[f"{key}_loss_rel_diff"] = diff / ours["first_loss"]
    return out


if __name__ == "__main__":
    main()
