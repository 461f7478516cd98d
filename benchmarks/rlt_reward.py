"""Benchmark: RLT rewards, batched (`reward_batch`) vs the per-sample loop (`reward_per_sample`).

    nice -n 19 python benchmarks/rlt_reward.py            # Qwen2.5-Coder-0.5B, fp32 on CPU, ~10 min
    python benchmarks/rlt_reward.py --device cuda --scenario group

Both score G = 8 explanations of ~256 tokens with the 0.5B model as teacher and as student
(real weights from the offline kit), on two batches:
- group: one question with G explanations, the batch a GRPO step scores (reward_batch runs the
  shared prompt, and for the teacher the solution, once);
- mixed: G different questions (only the template and system prompt are shared).
Questions and worked solutions come from reasoning-gym's gsm_symbolic; the explanations are the
solutions reworded and repeated to length (a timing benchmark: they need not teach well).

The per-sample loop runs one full forward per sample and model with a log_softmax over every
position, as the reference RLT implementation does; the batched path runs each model over the
batch (shared prefixes once) and the lm_head + logsumexp only where the rewards read. Both are
fp32, so the values agree to ~1e-6 and the speedup comes from work skipped, not precision lost.
On a CPU, a forward costs the same FLOPs batched or not: what remains is the shared prefix and
the positions the rewards never read.

It also counts the multiply-adds each path must do (transformer body per token run, lm_head per
position a log-prob is taken; attention left out): their ratio, `work_ratio`, is the speedup's
ceiling for skipping work alone, since on a CPU a batched forward costs the same per token.

Ends with `RESULT speedup=… max_abs_diff=… cpu_time_speedup=… work_ratio=… mixed_speedup=…`
(speedup: wall time of the group case; cpu_time_speedup: the same in process CPU time).
"""

from __future__ import annotations

import argparse
import time

import torch

from potstill.data import read_records
from potstill.models import load_model, load_tokenizer
from potstill.rlt import RewardConfig, RLTModels, Sample, reward_batch, reward_per_sample

MODEL = "qwen2.5-coder-0.5b-instruct"
LEADS = ["Let me restate what we know.", "Now check the arithmetic again.", "So, step by step:"]


def explanation(tokenizer, solutions: list[str], tokens: int, seed: int) -> str:
    """~`tokens` tokens of text made from the worked solutions, different for each seed."""
    parts, k = [], seed
    while len(tokenizer("\n\n".join(parts))["input_ids"]) < tokens:
        parts.append(f"{LEADS[k % len(LEADS)]} {solutions[k % len(solutions)]}")
        k += 1
    ids = tokenizer("\n\n".join(parts))["input_ids"][:tokens]
    return tokenizer.decode(ids)


def batches(tokenizer, g: int, tokens: int) -> dict[str, list[Sample]]:
    records = read_records(f"rg:gsm_symbolic?size={g}&seed=3")
    solutions = [r["solution"] for r in records]
    expl = [explanation(tokenizer, solutions, tokens, seed) for seed in range(g)]
    first = records[0]
    return {
        "group": [
            Sample(first["question"], first["solution"], expl[i], id=f"g{i}") for i in range(g)
        ],
        "mixed": [
            Sample(r["question"], r["solution"], expl[i], id=r["id"]) for i, r in enumerate(records)
        ],
    }


def work_ratio(models: RLTModels, samples: list[Sample], model) -> float:
    """Multiply-adds of the per-sample loop over those of the batched path (module docstring)."""
    from potstill.rlt.logprobs import common_prefix
    from potstill.rlt.rewards import RewardConfig, prepare

    rows = prepare(models, samples, RewardConfig())
    head = model.config.vocab_size * model.config.hidden_size
    tied = model.config.tie_word_embeddings
    body = sum(p.numel() for p in model.parameters()) - head * (1 if tied else 2)
    single = batched = 0
    for side in ("teacher_ids", "student_ids"):
        ids = [getattr(t, side) for t in rows]
        shared = common_prefix(ids)
        single += sum(len(r) for r in ids) * (body + head)
        batched += (shared + sum(len(r) - shared for r in ids)) * body
    read = sum(len(t.teacher_expl) + len(t.student_expl) + len(t.student_sol) for t in rows)
    return single / (batched + read * head)


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process). On a shared CPU the wall time moves
    with other jobs' load; the CPU time counts the work done, so both are printed."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--g", type=int, default=8, help="explanations per batch")
    parser.add_argument("--tokens", type=int, default=256, help="explanation length in tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scenario", choices=["group", "mixed", "both"], default="both")
    args = parser.parse_args()

    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL, dtype="float32", device=args.device).eval()
    models = RLTModels(model, tokenizer, model, tokenizer)  # one model as teacher and student
    cfg = RewardConfig()
    all_batches = batches(tokenizer, args.g, args.tokens)
    names = ["group", "mixed"] if args.scenario == "both" else [args.scenario]
    print(f"{MODEL} fp32 on {args.device}, {torch.get_num_threads()} CPU threads, G={args.g}")
    reward_batch(models, all_batches[names[0]][:2], cfg)  # warm-up: allocator, kernels
    figures = {}
    for name in names:
        samples = all_batches[name]
        batched, t_batch, c_batch = timed(reward_batch, models, samples, cfg)
        single, t_single, c_single = timed(reward_per_sample, models, samples, cfg)
        diff = max(
            abs(getattr(b, f) - getattr(s, f))
            for b, s in zip(batched, single, strict=True)
            for f in ("rlt_reward", "r_ss", "r_kl")
        )
        lengths = [r.explanation_tokens for r in batched]
        print(
            f"{name:6s} explanation tokens {min(lengths)}-{max(lengths)}: "
            f"per-sample {t_single:7.2f} s, batched {t_batch:7.2f} s, "
            f"speedup {t_single / t_batch:5.2f}x (CPU time {c_single:.1f} s vs {c_batch:.1f} s: "
            f"{c_single / c_batch:.2f}x), max |diff| {diff:.2e}"
        )
        print(f"       rewards: {', '.join(f'{r.rlt_reward:.4f}' for r in batched)}")
        ceiling = work_ratio(models, samples, model)
        print(f"       work per-sample / batched (multiply-adds): {ceiling:.2f}x")
        figures[name] = (t_single / t_batch, c_single / c_batch, diff, ceiling)
    main_case = figures.get("group") or figures[names[0]]
    extra = f" mixed_speedup={figures['mixed'][0]:.2f}" if "mixed" in figures else ""
    diff = max(f[2] for f in figures.values())
    print(
        f"RESULT speedup={main_case[0]:.2f} max_abs_diff={diff:.2e} "
        f"cpu_time_speedup={main_case[1]:.2f} work_ratio={main_case[3]:.2f}{extra}"
    )


if __name__ == "__main__":
    main()
