"""Benchmark: bfloat16 against float32 on this CPU, on the real 0.5B, in one run.

    python benchmarks/cpu_bf16.py            # Qwen2.5-Coder-0.5B-Instruct, ~4 min on 2 cores

`dtype: auto` is float32 on a CPU; a CPU with native bf16 math (avx512_bf16, AMX) runs bf16
matmuls several times faster, and `potstill doctor --config` says so. This measures what that is
worth where it counts, each pair back to back in one process:
- a LoRA training step (r 16, all linear layers; forward + backward of 4 sequences × 192 tokens;
  the adapters are float32 in both, as peft keeps them), tokens/s and the loss of the same batch;
- greedy generation (16 prompts, 64 new tokens, KV cache), new tokens/s, and how many of the 16
  bf16 answers equal the float32 ones token for token.

Ends with `RESULT train_speedup=… generate_speedup=… loss_rel_diff=… same_greedy=…/16`
(speedups: bf16's tokens/s over float32's).
"""

from __future__ import annotations

import time

import torch

from potstill.config.sections import LoraConfig
from potstill.data import read_records
from potstill.models import load_model, load_tokenizer

MODEL = "qwen2.5-coder-0.5b-instruct"


def batch(tokenizer, n: int, tokens: int) -> torch.Tensor:
    records = read_records(f"rg:gsm_symbolic?size={n}&seed=3")
    texts = [r["question"] + "\n" + r["solution"] * 4 for r in records]  # >= `tokens` each
    rows = [tokenizer(text)["input_ids"][:tokens] for text in texts]
    return torch.tensor(rows)


def train_step(model, ids: torch.Tensor) -> tuple[float, float]:
    """(seconds, loss) of one forward + backward; gradients dropped after."""
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds, loss.item()


def generate(model, tokenizer, prompts: list[str], new_tokens: int) -> tuple[float, list]:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    seconds = time.perf_counter() - start
    return seconds, [row[enc["input_ids"].shape[1] :].tolist() for row in out]


def measure(dtype: str, tokenizer, ids, prompts) -> dict:
    lora = LoraConfig(r=16, alpha=32, dropout=0.0)
    model = load_model(MODEL, dtype=dtype, device="cpu", lora=lora)
    train_step(model, ids[:1, :32])  # warm-up: thread pool, oneDNN kernels
    seconds, loss = min(train_step(model, ids) for _ in range(2))
    model.eval()
    generate(model, tokenizer, prompts[:2], 4)
    gen_seconds, answers = generate(model, tokenizer, prompts, 64)
    new = sum(len(a) for a in answers)
    return {"train_tps": ids.numel() / seconds, "loss": loss, "gen_tps": new / gen_seconds,
            "answers": answers}  # fmt: skip


def main() -> None:
    tokenizer = load_tokenizer(MODEL)
    ids = batch(tokenizer, 4, 192)
    questions = [r["question"] for r in read_records("rg:gsm_symbolic?size=16&seed=7")]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )  # fmt: skip
        for q in questions
    ]
    print(f"{MODEL} on CPU, {torch.get_num_threads()} threads")
    fp32 = measure("float32", tokenizer, ids, prompts)
    bf16 = measure("bfloat16", tokenizer, ids, prompts)
    for name, r in (("float32", fp32), ("bfloat16", bf16)):
        print(f"{name:9s} train {r['train_tps']:7.1f} tokens/s (loss {r['loss']:.5f}), "
              f"generate {r['gen_tps']:6.1f} new tokens/s")  # fmt: skip
    same = sum(a == b for a, b in zip(fp32["answers"], bf16["answers"], strict=True))
    rel = abs(bf16["loss"] - fp32["loss"]) / fp32["loss"]
    print(
        f"RESULT train_speedup={bf16['train_tps'] / fp32['train_tps']:.2f} "
        f"generate_speedup={bf16['gen_tps'] / fp32['gen_tps']:.2f} loss_rel_diff={rel:.2e} "
        f"same_greedy={same}/{len(prompts)}"
    )


if __name__ == "__main__":
    main()
