"""Benchmark: tokens/s of the `hf` backend, continuous batching vs its peers, in one run.

    python benchmarks/generate.py                      # Qwen2.5-Coder-0.5B, 48 prompts, 128 tokens
    python benchmarks/generate.py --quickstart         # the quickstart's teacher stage (1.5B)

Same model, same prompts, greedy, same max_new_tokens, four ways:
- continuous: `HFBackend(batch_size=16)`, a finished row's slot taken by the next prompt;
- static: `HFBackend(batch_size=16, continuous=False)`, the next batch starts when this one's
  last row ends (finished rows leave the batch, so they cost nothing, but their slots stay empty);
- hf_generate: transformers' `generate` over the same batches (left padding, greedy, the model's
  generation-config extras such as Qwen's repetition penalty switched off so it computes what
  ours does), each batch running until its longest row ends;
- single: one prompt at a time (`batch_size=1`), on the first `--single` prompts (its tokens/s
  does not depend on how many prompts it gets).
Every way produces the same completions (the backend is batch-invariant; counted, against
single on the prompts single ran and against continuous on all of them), so they generate the
same tokens and the ratios are throughput ratios. Runs on CPU by default (`--device cuda`).

`--quickstart` times what the quickstart's teacher stage does (configs/quickstart.yaml: the
1.5B teacher, its 80 training questions, batch 32, 96 new tokens, its system prompt), continuous
against static and hf_generate (no single row).

Ends with `RESULT speedup=… static_speedup=… hf_generate_speedup=… vs_static=… vs_hf_generate=…
same_outputs=…` (speedup: continuous over single; vs_*: continuous over that peer).
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml

from potstill.data import read_records
from potstill.models import load_model, load_tokenizer
from potstill.prompts import load_prompt
from potstill.teacher.backends import Request, Sampling, complete
from potstill.teacher.hf_backend import HFBackend, batch_order, render_prompt


def run(backend: HFBackend, questions: list[str], sampling: Sampling, system: str):
    start = time.perf_counter()
    outs = complete(backend, questions, sampling, system_prompt=system)
    seconds = time.perf_counter() - start
    return [o.text for o in outs], sum(o.completion_tokens for o in outs), seconds


def run_hf_generate(model, tokenizer, questions, sampling, system, batch_size):
    """transformers' generate over the batches our backend makes, greedy, nothing else on."""
    system_turn = {"role": "system", "content": system}
    prompts = [
        render_prompt(tokenizer, Request(str(i), (system_turn, {"role": "user", "content": q})))
        for i, q in enumerate(questions)
    ]
    eos_ids = HFBackend(model, tokenizer).eos_ids
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    texts, tokens = [""] * len(prompts), 0
    tokenizer.padding_side = "left"
    start = time.perf_counter()
    for idx in batch_order(lengths, batch_size):
        inputs = tokenizer(
            [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=sampling.max_new_tokens, do_sample=False,
                repetition_penalty=1.0, top_k=None, top_p=None, temperature=None,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        for row, i in enumerate(idx):
            new = out[row, inputs["input_ids"].shape[1] :].tolist()
            eos = [n for n, t in enumerate(new) if t in eos_ids]
            new = new[: eos[0]] if eos else new
            texts[i], tokens = tokenizer.decode(new, skip_special_tokens=True), tokens + len(new)
    return texts, tokens, time.perf_counter() - start


def workload(args) -> tuple[str, list[str], str, Sampling, int]:
    if args.quickstart:
        cfg = yaml.safe_load(open("configs/quickstart.yaml"))
        questions = [r["question"] for r in read_records(cfg["data"]["train"])]
        dec = cfg["decoding"]
        system = load_prompt(dec["system_prompt"])
        return cfg["teacher"]["name"], questions, system, Sampling(dec["max_new_tokens"]), 32
    records = read_records(f"rg:gsm_symbolic?size={args.prompts}&seed=11")
    system = load_prompt("step_by_step")
    return args.model, [r["question"] for r in records], system, Sampling(args.max_new_tokens), 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--single", type=int, default=16, help="prompts run one at a time")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--quickstart", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    name, questions, system, sampling, batch = workload(args)
    batch = args.batch_size or batch
    single_n = 0 if args.quickstart else min(args.single, len(questions))
    tokenizer = load_tokenizer(name)
    model = load_model(name, device=args.device, dtype=args.dtype).eval()
    run(HFBackend(model, tokenizer, batch_size=2), questions[:2], Sampling(4), system)  # warm-up

    rows = {
        "continuous": run(
            HFBackend(model, tokenizer, batch_size=batch), questions, sampling, system
        ),  # noqa: E501
        "static": run(
            HFBackend(model, tokenizer, batch_size=batch, continuous=False),
            questions,
            sampling,
            system,
        ),  # fmt: skip
        "hf_generate": run_hf_generate(model, tokenizer, questions, sampling, system, batch),
    }
    if single_n:
        rows["single"] = run(
            HFBackend(model, tokenizer, batch_size=1), questions[:single_n], sampling, system
        )
    report(name, args, rows, len(questions), batch, sampling, single_n)


def report(name, args, rows, n, batch, sampling, single_n) -> None:
    rate = {k: tokens / seconds for k, (_, tokens, seconds) in rows.items()}
    base = rows["continuous"][0]
    print(f"model {name} on {args.device}, {n} prompts, batch {batch}, "
          f"max_new_tokens={sampling.max_new_tokens}, greedy")  # fmt: skip
    for key, (_, tokens, seconds) in rows.items():
        print(f"  {key:12s} {tokens:6d} tokens in {seconds:7.1f} s = {rate[key]:6.2f} tok/s")
    same = {
        k: f"{sum(a == b for a, b in zip(base, texts, strict=False))}/{len(texts)}"
        for k, (texts, _, _) in rows.items()
        if k != "continuous"
    }
    print("  identical completions to continuous:", ", ".join(f"{k} {v}" for k, v in same.items()))
    fields = []
    if "single" in rate:
        fields += [
            f"speedup={rate['continuous'] / rate['single']:.2f}",
            f"static_speedup={rate['static'] / rate['single']:.2f}",
            f"hf_generate_speedup={rate['hf_generate'] / rate['single']:.2f}",
        ]
    fields += [
        f"vs_static={rate['continuous'] / rate['static']:.2f}",
        f"vs_hf_generate={rate['continuous'] / rate['hf_generate']:.2f}",
        f"continuous_tok_s={rate['continuous']:.2f}",
        "same_outputs=" + ",".join(f"{k}:{v}" for k, v in same.items()),
    ]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
