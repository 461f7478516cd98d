"""GPU path check: batched `hf` generation and bf16 SFT steps on a Qwen2.5-0.5B-shaped model.

    python benchmarks/gpu_paths.py          # on a CUDA machine; ~3 min on one H100

The weights are random (GPU machines here cannot fetch the kit's real weights), which is fine for
what this measures: throughput and memory of the code paths a GPU user runs — generation at batch
16 vs 1 with the KV cache, SFT with LoRA on bf16 weights, and full fine-tuning with fp32 master
weights under bf16 autocast (`train.precision: auto`), through the real `run_sft` (run dir,
checkpoints, final save).

Ends with `RESULT gen_speedup=… gen_batched_tok_s=… sft_lora_tok_s=… sft_full_tok_s=…
sft_full_peak_gib=…`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build_tokenizer  # noqa: E402  (the tiny real tokenizer the tests use)

from potstill.config import load_config  # noqa: E402
from potstill.data import write_records  # noqa: E402
from potstill.stages.sft import SFTConfig
from potstill.teacher.backends import Sampling, complete  # noqa: E402
from potstill.teacher.hf_backend import HFBackend  # noqa: E402
from potstill.train.loop import read_metrics  # noqa: E402


def qwen05b_shaped(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def generation(model_dir: Path) -> tuple[float, float]:
    from potstill.models import load_model, load_tokenizer

    tok, model = load_tokenizer(model_dir), load_model(model_dir, device="cuda")
    questions = [f"What is {i} + {i * 7}? Let's think step by step." for i in range(16)]
    sampling = Sampling(max_new_tokens=128)
    rates = {}
    for batch in (16, 1, 16):  # the first batched run warms up CUDA
        backend = HFBackend(model, tok, batch_size=batch)
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = complete(backend, questions, sampling)
        torch.cuda.synchronize()
        rates[batch] = sum(o.completion_tokens for o in outs) / (time.perf_counter() - start)
    print(f"generation: batch 16 {rates[16]:.0f} tok/s, batch 1 {rates[1]:.0f} tok/s")
    return rates[16] / rates[1], rates[16]


def sft(model_dir: Path, data: Path, out: Path, *overrides: str) -> tuple[float, float]:
    from potstill.stages.sft import run_sft

    cfg = load_config(
        SFTConfig,
        overrides=[
            f"model.name={model_dir}",
            f"data.source={data}",
            "data.system_prompt=null",
            "train.max_steps=12",
            "train.micro_batch_size=8",
            "train.grad_accum=2",
            "train.max_seq_len=1024",
            "train.save_every=12",
            f"run.output_dir={out}",
            *overrides,
        ],
    )
    torch.cuda.reset_peak_memory_stats()
    run_sft(cfg)
    metrics = read_metrics(out / "metrics.jsonl")
    rate = sum(m["tokens_per_s"] for s, m in metrics.items() if s > 2) / (len(metrics) - 2)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"sft {' '.join(overrides)}: {rate:.0f} target tok/s, peak {peak:.1f} GiB")
    return rate, peak


def main() -> None:
    assert torch.cuda.is_available(), "run this on a CUDA machine"
    print(torch.cuda.get_device_name(), "bf16:", torch.cuda.is_bf16_supported())
    work = Path(tempfile.mkdtemp())
    tok = build_tokenizer()
    model_dir = work / "qwen05b-random"
    qwen05b_shaped(tok).to(torch.bfloat16).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [
        {"id": f"r{i}", "question": f"What is {i} + 25? " * 4, "completion": "Let's think. " * 90}
        for i in range(256)
    ]
    data = write_records(work / "data.jsonl", rows)
    speedup, batched = generation(model_dir)
    lora_rate, _ = sft(model_dir, data, work / "lora", "model.lora={r: 16}", "model.dtype=auto")
    full_rate, full_peak = sft(
        model_dir, data, work / "full", "model.lora=null", "model.dtype=float32"
    )
    print(
        f"RESULT gen_speedup={speedup:.2f} gen_batched_tok_s={batched:.0f} "
        f"sft_lora_tok_s={lora_rate:.0f} sft_full_tok_s={full_rate:.0f} "
        f"sft_full_peak_gib={full_peak:.1f}"
    )


if __name__ == "__main__":
    main()
