"""Speed of the cross-tokenizer loss on the kit pair, two choices against their peers, in one
process with the runs interleaved (the machine is shared: ratios, not absolute times).

    PYTHONPATH=src python benchmarks/cross_loss_speed.py [--rows 512] [--repeats 2]

1. `losses.cross_chunked.chunked_cross_sums` (each chunk's gradients taken right after its
   forward) against the same chunks under activation checkpointing (forward once, then every
   chunk recomputed in backward): the hybrid loss with a full sort, forward + backward.
2. ULD's `top_k=64` (the k largest one by one, the rest as one mass) against the full sort, on
   a teacher with mass on 64 tokens only (a top-64 cache): the values must agree.

Heads: the real lm_heads of SmolLM2-135M-Instruct (student) and Qwen2.5-Coder-1.5B-Instruct
(teacher); hidden states random, 4 of every 5 student rows paired. Last line:
`RESULT local_backward_over_recompute_time=… topk64_over_full_sort_time=… topk64_abs_diff=…`.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_tokenizer import STUDENT, TEACHER, UNPAIRED_EVERY, _head  # noqa: E402

from potstill.losses.cross_chunked import chunked_cross_sums, cross_chunk_rows  # noqa: E402
from potstill.losses.cross_vocab import hybrid, vocab_matches  # noqa: E402


def recompute_sums(hidden, weight, labels, paired, teacher_rows, soft, chunk):
    """The peer: the same chunks, each under activation checkpointing."""

    def chunk_sums(h, lab, local, lo, hi):
        logits = F.linear(h, weight)
        ce = F.cross_entropy(logits, lab, reduction="sum")
        if hi == lo:
            return ce
        return ce + soft(logits[local], teacher_rows(lo, hi), chunk_size=hi - lo).sum()

    total, rows = hidden.new_zeros(()), hidden.shape[0]
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        lo = int(torch.searchsorted(paired, torch.tensor(start)))
        hi = int(torch.searchsorted(paired, torch.tensor(end)))
        part = checkpoint(
            chunk_sums, hidden[start:end], labels[start:end], paired[lo:hi] - start, lo, hi,
            use_reentrant=False,
        )  # fmt: skip
        total = total + part
    return total


def timed(fn) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    (w_s, tok_s), (w_t, tok_t) = _head(STUDENT), _head(TEACHER)
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(args.rows, w_s.shape[1], generator=gen) * 0.5).requires_grad_(True)
    paired = torch.tensor([i for i in range(args.rows) if i % UNPAIRED_EVERY != UNPAIRED_EVERY - 1])
    t_hidden = torch.randn(len(paired), w_t.shape[1], generator=gen) * 0.5
    labels = torch.randint(0, w_s.shape[0], (args.rows,), generator=gen)
    match = vocab_matches(tok_t.get_vocab(), tok_s.get_vocab())
    dense = F.linear(t_hidden, w_t)  # the teacher's rows, once: both ways read the same ones
    top = dense.topk(64, dim=-1)
    cached = torch.full_like(dense, -1e4).scatter_(1, top.indices, top.values)
    chunk, vocab = cross_chunk_rows(w_s.shape[0], w_t.shape[0]), w_t.shape[0]

    def ours(teacher, soft):
        hidden.grad = None
        ce, s = chunked_cross_sums(
            hidden, w_s, None, labels, paired, lambda lo, hi: teacher[lo:hi], soft,
            teacher_vocab=vocab,
        )  # fmt: skip
        (ce + s).backward()
        return (ce + s).item()

    def peer(teacher, soft):
        hidden.grad = None
        total = recompute_sums(
            hidden, w_s, labels, paired, lambda lo, hi: teacher[lo:hi], soft, chunk
        )
        total.backward()
        return total.item()

    full = functools.partial(hybrid, match=match, divergence="forward_kl")
    top64 = functools.partial(full, top_k=64)
    times = {"local": [], "recompute": [], "top64": [], "full_sort": []}
    values = {}
    for _ in range(args.repeats):
        for name, fn in (
            ("local", lambda: ours(dense, full)), ("recompute", lambda: peer(dense, full)),
            ("top64", lambda: ours(cached, top64)), ("full_sort", lambda: ours(cached, full)),
        ):  # fmt: skip
            seconds, values[name] = timed(fn)
            times[name].append(seconds)
            print(f"{name:10} {seconds:7.2f} s  loss sum {values[name]:.4f}", flush=True)
    best = {name: min(t) for name, t in times.items()}
    print(f"{args.rows} rows, chunks of {chunk}; best of {args.repeats} each")
    print(
        f"RESULT local_backward_over_recompute_time={best['local'] / best['recompute']:.3f} "
        f"topk64_over_full_sort_time={best['top64'] / best['full_sort']:.3f} "
        f"topk64_abs_diff={abs(values['top64'] - values['full_sort']):.3g} "
        f"local_vs_recompute_abs_diff={abs(values['local'] - values['recompute']):.3g}"
    )


if __name__ == "__main__":
    main()
