"""Benchmark: tokens/s of the `hf` backend at batch 16 vs one prompt at a time.

    python benchmarks/generate.py                  # Qwen2.5-Coder-0.5B, 16 prompts, 128 tokens
    python benchmarks/generate.py --model qwen2.5-coder-1.5b-instruct --max-new-tokens 64

Same model, same 16 prompts (reasoning-gym gsm_symbolic questions through the chat template),
greedy decoding, same max_new_tokens: the two runs produce the same completions (the backend is
batch-invariant), so they generate the same tokens and the ratio is a pure throughput ratio. A
batch runs until its longest row ends; that padding cost is counted, as it is in real use.
Runs on CPU by default (`--device cuda` on a GPU).

Ends with `RESULT speedup=… batched_tok_s=… single_tok_s=… same_outputs=…`.
"""

from __future__ import annotations

import argparse
import time

import torch

from potstill.data import read_records
from potstill.models import load_model, load_tokenizer
from potstill.prompts import load_prompt
from potstill.teacher.backends import Sampling, complete
from potstill.teacher.hf_backend import HFBackend


def run(backend: HFBackend, questions: list[str], sampling: Sampling, system: str):
    start = time.perf_counter()
    outs = complete(backend, questions, sampling, system_prompt=system)
    seconds = time.perf_counter() - start
    tokens = sum(o.completion_tokens for o in outs)
    return outs, tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    records = read_records(f"rg:gsm_symbolic?size={args.prompts}&seed=11")
    questions = [r["question"] for r in records]
    system = load_prompt("step_by_step")
    sampling = Sampling(max_new_tokens=args.max_new_tokens)

    run(
        HFBackend(model, tokenizer, batch_size=2), questions[:2], Sampling(max_new_tokens=4), system
    )
    batched, b_tokens, b_sec = run(
        HFBackend(model, tokenizer, batch_size=args.batch_size), questions, sampling, system
    )
    single, s_tokens, s_sec = run(
        HFBackend(model, tokenizer, batch_size=1), questions, sampling, system
    )
    same = sum(a.text == b.text for a, b in zip(batched, single, strict=True))
    b_rate, s_rate = b_tokens / b_sec, s_tokens / s_sec
    print(
        f"model {args.model} on {args.device}, {len(questions)} prompts, "
        f"max_new_tokens={args.max_new_tokens}, greedy"
    )
    print(f"  batch {args.batch_size}: {b_tokens} tokens in {b_sec:.1f} s = {b_rate:.1f} tok/s")
    print(f"  one at a time: {s_tokens} tokens in {s_sec:.1f} s = {s_rate:.1f} tok/s")
    print(f"  identical completions: {same}/{len(questions)}")
    print(
        f"RESULT speedup={b_rate / s_rate:.2f} batched_tok_s={b_rate:.1f} "
        f"single_tok_s={s_rate:.1f} same_outputs={same}/{len(questions)}"
    )


if __name__ == "__main__":
    main()
