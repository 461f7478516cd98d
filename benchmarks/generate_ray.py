"""Benchmark: generation throughput of `engine: ray` with 1 worker vs 2 workers, same prompts.

    python benchmarks/generate_ray.py          # Qwen2.5-Coder-0.5B, 16 prompts, 32 tokens
    python benchmarks/generate_ray.py --model qwen2.5-coder-1.5b-instruct --prompts 32

Both runs use the same model (the kit's 0.5B by default, a small real model), the same prompts
(reasoning-gym basic_arithmetic through the chat template), the same per-sample seeds and
batches, greedy decoding and the same max_new_tokens: they generate the same tokens (checked,
`same_outputs`), so the ratio is a pure throughput ratio. Each worker is one Ray actor with
`--cpus-per-worker` CPUs (its torch threads) on a local cluster of exactly workers × those CPUs.
Timed: the generation, from the first batch sent to the last sample back (cluster start and
model loading are reported apart, as `startup_s`). On a machine shared with other jobs the
ratio says what a second worker bought there and then, not what it buys on idle cores.

Ends with `RESULT workers1_rps=… workers2_rps=… speedup=…` (rps: samples a second).
"""

from __future__ import annotations

import argparse
import time

from potstill.config.engine import RayConfig
from potstill.config.sections import BackendConfig, ModelConfig
from potstill.data import read_records
from potstill.data.seeds import sample_seed
from potstill.teacher.backends import Request, Sampling
from potstill.teacher.ray_backend import RayBackend


def requests_for(prompts: int) -> list[Request]:
    records = read_records(f"rg:basic_arithmetic?size={prompts}&seed=11")
    return [
        Request(
            key=r["id"],
            messages=({"role": "user", "content": r["question"]},),
            seed=sample_seed(0, r["id"], 0),
        )
        for r in records
    ]


def run(workers: int, args, requests: list[Request]) -> dict:
    """One pool of `workers` actors: startup seconds, generation seconds, samples/s, outputs."""
    start = time.perf_counter()
    ray = RayConfig(num_workers=workers, num_cpus_per_worker=args.cpus_per_worker)
    model = ModelConfig(name=args.model, device="cpu", dtype=args.dtype)
    backend = RayBackend(model, BackendConfig(), ray, batch_size=args.batch_size)
    try:
        backend.prompt_tokens_many(requests)  # measured before the clock, as the stage does
        ready = time.perf_counter()
        sampling = Sampling(max_new_tokens=args.max_new_tokens)
        outs = {req.key: out for req, out in backend.generate(requests, sampling)}
        seconds = time.perf_counter() - ready
    finally:
        backend.close()
    tokens = sum(o.completion_tokens for o in outs.values())
    return {
        "startup_s": ready - start,
        "seconds": seconds,
        "rps": len(outs) / seconds,
        "tok_s": tokens / seconds,
        "texts": {key: out.text for key, out in outs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    args = parser.parse_args()

    requests = requests_for(args.prompts)
    print(
        f"{args.model}: {len(requests)} prompts, batch {args.batch_size}, "
        f"{args.max_new_tokens} new tokens, greedy; {args.cpus_per_worker:g} CPU a worker"
    )
    one = run(1, args, requests)
    two = run(2, args, requests)
    print(f"{'workers':>8} {'startup s':>10} {'gen s':>8} {'samples/s':>10} {'tok/s':>8}")
    for name, r in (("1", one), ("2", two)):
        print(
            f"{name:>8} {r['startup_s']:>10.1f} {r['seconds']:>8.1f} {r['rps']:>10.3f} "
            f"{r['tok_s']:>8.1f}"
        )
    speedup = two["rps"] / one["rps"]
    same = one["texts"] == two["texts"]
    print(f"2 workers / 1 worker: {speedup:.2f}x samples/s (ideal 2.00x); same outputs: {same}")
    print(
        f"RESULT workers1_rps={one['rps']:.4f} workers2_rps={two['rps']:.4f} "
        f"speedup={speedup:.2f} same_outputs={same}"
    )


if __name__ == "__main__":
    main()
