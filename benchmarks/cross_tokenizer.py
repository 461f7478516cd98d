"""Cross-tokenizer distillation on the kit's real pair: Qwen2.5-Coder-1.5B-Instruct (151,936 ids)
teaches SmolLM2-135M-Instruct (49,152 ids).

    PYTHONPATH=src python benchmarks/cross_tokenizer.py            # memory + the comparison
    PYTHONPATH=src python benchmarks/cross_tokenizer.py --quick    # memory at a small size only
    PYTHONPATH=src python benchmarks/cross_tokenizer.py --measure-loss fused|full_logits|plain N

Two parts, one run:

1. **Memory of the loss** (forward + backward, each in a fresh subprocess with glibc's mmap
   threshold fixed so freed memory is returned and the resident set shows what is held): the
   student's final hidden states at N target positions, the teacher's at the 80 % of them that
   are paired (a typical `aligned`), the two models' real lm_heads, the hybrid loss. Three ways:
   `fused` (potstill: `losses.cross_chunked`, neither side's logits whole), `full_logits` (both
   sides' logits built whole, the loss chunked: potstill before this benchmark) and `plain`
   (both logits whole and the loss on all rows at once, what a straightforward implementation
   does). Peak resident set above the inputs, and seconds.
2. **Does KD across tokenizers beat SFT on the same teacher text?** `potstill compare` on
   configs/compare-cross-tokenizer-cpu.yaml: the same verified teacher traces, the same steps and
   target tokens, `sft` vs `logit` (the hybrid loss from a top-64 cache with token spans), three
   seeds; held-out accuracy ± s.e. per set and each student's NLL of the teacher's verified
   held-out answers. Resumable: rerun the command and only what is missing runs.

Last line: `RESULT fused_over_plain_peak=… fused_over_full_logits_peak=… fused_over_plain_time=…
nll_sft=… nll_kd=… acc_sft=… acc_kd=…` (accuracy pooled over the held-out sets).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TEACHER, STUDENT = "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "compare-cross-tokenizer-cpu.yaml"
UNPAIRED_EVERY = 5  # every 5th target unpaired: 0.8 paired per target, as `aligned` logs
WAYS = ("fused", "full_logits", "plain")


def _head(name: str):
    """(lm_head weight (V, H) float32, tokenizer) of a kit model, read from its safetensors
    (the input embeddings where the head is tied), without building the model."""
    from safetensors import safe_open

    from potstill.models import load_tokenizer, resolve_model_path

    folder = Path(resolve_model_path(name))
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in ("lm_head.weight", "model.embed_tokens.weight"):
                if key in f.keys():
                    tensors[key] = f.get_tensor(key)
    weight = tensors.get("lm_head.weight", tensors.get("model.embed_tokens.weight"))
    return weight.float(), load_tokenizer(name)


def measure_loss(way: str, rows: int) -> dict:
    """One forward + backward of the hybrid loss computed `way`; peak RSS above the inputs."""
    import torch
    import torch.nn.functional as F

    from potstill.eval.cost import MemoryMeter
    from potstill.losses.cross_chunked import chunked_cross_sums
    from potstill.losses.cross_vocab import hybrid, vocab_matches

    torch.set_num_threads(2)
    (w_s, tok_s), (w_t, tok_t) = _head(STUDENT), _head(TEACHER)
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(rows, w_s.shape[1], generator=gen) * 0.5).requires_grad_(True)
    paired = torch.tensor([i for i in range(rows) if i % UNPAIRED_EVERY != UNPAIRED_EVERY - 1])
    t_hidden = torch.randn(len(paired), w_t.shape[1], generator=gen) * 0.5
    labels = torch.randint(0, w_s.shape[0], (rows,), generator=gen)
    match = vocab_matches(tok_t.get_vocab(), tok_s.get_vocab())
    soft = functools.partial(hybrid, match=match, divergence="forward_kl")
    with MemoryMeter(interval=0.005) as meter:
        start = time.perf_counter()
        if way == "fused":
            rows_of = lambda lo, hi: F.linear(t_hidden[lo:hi], w_t)  # noqa: E731
            ce, soft_sum = chunked_cross_sums(
                hidden, w_s, None, labels, paired, rows_of, soft, teacher_vocab=w_t.shape[0]
            )
        else:
            logits = F.linear(hidden, w_s)  # (N, V_s)
            ce = F.cross_entropy(logits, labels, reduction="sum")
            teacher = F.linear(t_hidden, w_t)  # (n, V_t)
            chunk = {"full_logits": None, "plain": len(paired)}[way]
            soft_sum = soft(logits[paired], teacher, chunk_size=chunk).sum()
        ((ce + soft_sum) / rows).backward()
        seconds = time.perf_counter() - start
    return {
        "way": way, "rows": rows, "pairs": len(paired), "peak_bytes": meter.peak_bytes,
        "seconds": seconds, "loss": (ce.item() + soft_sum.item()) / rows,
    }  # fmt: skip


def _measure(way: str, rows: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--measure-loss", way, str(rows)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{way} at {rows} rows failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_part(rows: int) -> dict:
    results = {way: _measure(way, rows) for way in WAYS}
    print(f"\nloss memory, forward + backward, {rows} target rows, "
          f"{results['fused']['pairs']} paired, V_s 49,152, V_t 151,936, float32")  # fmt: skip
    print(f"{'way':12} {'peak MiB':>9} {'seconds':>8} {'loss':>10}")
    for way, r in results.items():
        print(f"{way:12} {r['peak_bytes'] / 2**20:9.0f} {r['seconds']:8.2f} {r['loss']:10.5f}")
    same = abs(results["fused"]["loss"] - results["plain"]["loss"])
    print(f"|fused - plain| loss: {same:.2e}")
    return results


def _pooled(row: dict) -> tuple[float, float]:
    """Accuracy pooled over the with-prompt held-out sets (each set's n equal): mean, s.e."""
    cells = [c for key, c in row["cells"].items() if c and key.endswith("/with_prompt")]
    mean = sum(c["accuracy"] for c in cells) / len(cells)
    se = sum(c["stderr"] ** 2 for c in cells) ** 0.5 / len(cells)
    return mean, se


def compare_part(config: Path) -> dict:
    from rich.console import Console

    from potstill.config import load_config
    from potstill.stages.compare import CompareConfig, load_summary, run_compare

    cfg = load_config(CompareConfig, config)
    start = time.perf_counter()
    run_compare(cfg, Console(stderr=True))
    print(f"\ncompare ({config.name}) took {time.perf_counter() - start:.0f} s this run")
    table = load_summary(cfg.run.output_dir)
    print(table["markdown"])
    rows = {r["model"]: r for r in table["rows"]}
    out = {}
    for key, name in (("sft", "sft"), ("kd", "logit")):
        mean, se = _pooled(rows[name])
        nll = rows[name]["nll"]["pooled"]
        out |= {f"acc_{key}": mean, f"acc_{key}_se": se, f"nll_{key}": nll["nll"]}
        out[f"nll_{key}_sd"] = nll.get("sd", 0.0)
    print(
        f"pooled accuracy: sft {out['acc_sft']:.1%} ± {out['acc_sft_se']:.1%}, cross-tokenizer "
        f"KD {out['acc_kd']:.1%} ± {out['acc_kd_se']:.1%}; held-out NLL of the teacher's "
        f"answers: sft {out['nll_sft']:.3f} (sd {out['nll_sft_sd']:.3f}), KD "
        f"{out['nll_kd']:.3f} (sd {out['nll_kd_sd']:.3f})"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="memory at 256 rows only")
    parser.add_argument("--rows", type=int, default=2048, help="target rows for the memory part")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--measure-loss", nargs=2, metavar=("WAY", "ROWS"))
    args = parser.parse_args()
    if args.measure_loss:
        print(json.dumps(measure_loss(args.measure_loss[0], int(args.measure_loss[1]))))
        return
    mem = memory_part(256 if args.quick else args.rows)
    fused, full, plain = (mem[w] for w in WAYS)
    result = {
        "rows": fused["rows"],
        "fused_over_plain_peak": fused["peak_bytes"] / plain["peak_bytes"],
        "fused_over_full_logits_peak": fused["peak_bytes"] / full["peak_bytes"],
        "fused_over_plain_time": fused["seconds"] / plain["seconds"],
        "loss_abs_diff": abs(fused["loss"] - plain["loss"]),
    }
    if not args.quick:
        result |= compare_part(args.config)
    print("RESULT " + " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
    ))  # fmt: skip


if __name__ == "__main__":
    main()
