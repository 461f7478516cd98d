"""Benchmark: distillation loss forward + backward including the lm_head, fp32 on CPU.

    python benchmarks/kd_loss.py                 # vocabulary sweep: plain vs ours eager / compiled
    python benchmarks/kd_loss.py --v 32000,151936 --n 512   # some vocabularies, N fixed
    python benchmarks/kd_loss.py --vs-trl        # N=2048, H=896, V=151936 (Qwen2.5), ~10 min
    python benchmarks/kd_loss.py --vs-trl --n 256 --repeats 1   # a quick look

Each case runs in a fresh process: peak memory is the process's high-water mark above what the
inputs already hold (reset through /proc/self/clear_refs), time is the best of `--repeats` runs.

Vocabulary sweep (the default): for each V of `--v` (32k Llama-2, 49k SmolLM, 128k Llama-3, 152k
Qwen2.5, 262k Gemma-3), H=64 and N = 60M // V target tokens (every [N, V] buffer 229 MiB; `--n`
fixes N), the forward-KL loss with the teacher's logits given: plain PyTorch (`kd_loss` on full
logits) vs `chunked_kd_loss` with eager kernels and with torch.compile. Each case runs once
first (the compile, lazily made buffers) and the compiled one also at N // 3 and N - 1 tokens,
to count the graphs torch.compile made; then the peak is reset and the repeats timed. glibc maps
every buffer on its own there (MALLOC_MMAP_THRESHOLD_), so a reused heap cannot hide a peak. Ends
with `RESULT eager_over_plain_peak_max=… compiled_over_plain_peak_max=… eager_over_plain_time_max=…
compiled_over_plain_time_max=… recompiles=… max_rel_err=…`.

`--vs-trl`, at one V:
Setting 1, teacher given as logits [N, V]: ours (`chunked_kd_loss` with `TeacherLogits`) vs TRL
1.16's `generalized_jsd_loss` (trl.experimental.gkd) on logits from the same lm_head, and vs plain
PyTorch (our pure divergences on full logits).
Setting 2, teacher given as hidden states + lm_head (online): ours (`TeacherHidden`) vs TRL 1.16's
chunked kernel (`_chunked_divergence_loss`, what its DistillationTrainer runs); and the floor, the
bare matmuls this loss needs (student forward, both gradient matmuls, teacher forward).

Ends with `RESULT mem_ratio=… time_ratio=… chunked_mem_ratio=… chunked_time_ratio=… floor_ratio=…
compile_speedup=… (eager kernels / compiled)
max_rel_err=…`.
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

CASES = {
    "plain_fkl": "plain PyTorch, forward KL (full logits)",
    "plain_jsd": "plain PyTorch, JSD(0.5) (full logits)",
    "trl_gkd_jsd": "TRL generalized_jsd_loss, JSD(0.5) (full logits)",
    "ours_logits_fkl": "potstill chunked, teacher logits, forward KL",
    "ours_logits_jsd": "potstill chunked, teacher logits, JSD(0.5)",
    "trl_chunked_jsd": "TRL chunked kernel, teacher hidden, JSD(0.5)",
    "ours_hidden_jsd": "potstill chunked, teacher hidden, JSD(0.5)",
    "ours_hidden_jsd_eager": "potstill chunked, teacher hidden, JSD(0.5), no torch.compile",
    "floor_online": "bare matmuls: student fwd + 2 grads + teacher fwd",
}
VOCAB_CASES = ("vocab_plain", "vocab_eager", "vocab_compiled")
VOCABS = "32000,49152,128256,151936,262144"
VOCAB_ELEMENTS = 60_000_000
"""N × V of the sweep's [N, V] buffers when --n is not given (229 MiB each in float32)."""


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def run_case(name: str, n: int, h: int, v: int, repeats: int, grads_out: str) -> dict:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    student_hidden = torch.randn(n, h).requires_grad_()
    student_weight = (torch.randn(v, h) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,))
    teacher_hidden = torch.randn(n, h)
    teacher_weight = torch.randn(v, h) * h**-0.5
    teacher_logits = None
    if "logits" in name or name.startswith(("plain", "trl_gkd")):
        teacher_logits = teacher_hidden @ teacher_weight.T  # given as input: not counted

    # Imports happen here, outside the timed region.
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from potstill.losses import TeacherHidden, TeacherLogits, chunked_kd_loss, forward_kl, jsd

    def step():
        student_hidden.grad = student_weight.grad = None
        if name == "plain_fkl":
            loss = forward_kl(student_hidden @ student_weight.T, teacher_logits).mean()
        elif name == "plain_jsd":
            loss = jsd(student_hidden @ student_weight.T, teacher_logits, beta=0.5).mean()
        elif name == "trl_gkd_jsd":
            logits = student_hidden @ student_weight.T
            loss = GKDTrainer.generalized_jsd_loss(
                logits[None], teacher_logits[None], labels=labels[None], beta=0.5
            )
        elif name.startswith("ours_logits"):
            divergence = "forward_kl" if name.endswith("fkl") else "jsd"
            params = {"beta": 0.5} if divergence == "jsd" else {}
            loss = chunked_kd_loss(
                student_hidden,
                student_weight,
                labels,
                TeacherLogits(teacher_logits),
                divergence=divergence,
                kd_ratio=1.0,
                **params,
            ).loss
        elif name.startswith("ours_hidden_jsd"):
            loss = chunked_kd_loss(
                student_hidden,
                student_weight,
                labels,
                TeacherHidden(teacher_hidden, teacher_weight),
                divergence="jsd",
                beta=0.5,
                kd_ratio=1.0,
                compile=not name.endswith("eager"),
            ).loss
        elif name == "trl_chunked_jsd":
            mask = torch.ones(1, n, dtype=torch.long)
            loss, _, _ = _chunked_divergence_loss(
                student_hidden[None],
                teacher_hidden[None],
                student_weight,
                teacher_weight,
                mask,
                beta=0.5,
            )
        elif name == "floor_online":
            with torch.no_grad():
                logits = student_hidden @ student_weight.T
                teacher = teacher_hidden @ teacher_weight.T
                del logits, teacher
                grad = torch.empty(
                    n, v
                ).normal_()  # stands for dL/dlogits; its cost is not the floor's
                start = time.perf_counter()
                _ = grad @ student_weight
                _ = grad.T @ student_hidden
                return None, time.perf_counter() - start
        start = time.perf_counter()
        loss.backward()
        return loss, time.perf_counter() - start

    baseline = _rss_kib("VmRSS")
    _reset_peak()
    times, loss = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        loss, inner = step()
        elapsed = time.perf_counter() - start
        if name == "floor_online":  # only the matmuls: exclude making the random gradient
            elapsed = (
                elapsed
                - (elapsed - inner)
                + _timed_forward(student_hidden, student_weight, teacher_hidden, teacher_weight)
            )
        times.append(elapsed)
    peak = _rss_kib("VmHWM")
    result = {"case": name, "time_s": min(times), "peak_mib": (peak - baseline) / 1024}
    if loss is not None:
        result["loss"] = float(loss)
        save_file(
            {
                "grad_hidden": student_hidden.grad.contiguous(),
                "grad_weight_rows": student_weight.grad[:4096].contiguous(),
            },
            grads_out,
        )
    return result


def run_vocab_case(name: str, n: int, h: int, v: int, repeats: int, grads_out: str) -> dict:
    """One case of the vocabulary sweep (see the module docstring)."""
    import torch
    from safetensors.torch import save_file
    from torch._dynamo.utils import counters

    from potstill.losses import TeacherLogits, chunk_rows, chunked_kd_loss, kd_loss

    torch.manual_seed(0)
    student_hidden = torch.randn(n, h).requires_grad_()
    student_weight = (torch.randn(v, h) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,))
    teacher_logits = torch.randn(n, h) @ (torch.randn(v, h) * h**-0.5).T  # an input: not counted

    def step(rows: int = n):
        student_hidden.grad = student_weight.grad = None
        hidden, teacher = student_hidden[:rows], TeacherLogits(teacher_logits[:rows])
        if name == "vocab_plain":
            loss = kd_loss(hidden @ student_weight.T, labels[:rows], teacher).loss
        else:
            compile = name == "vocab_compiled"
            loss = chunked_kd_loss(
                hidden, student_weight, labels[:rows], teacher, compile=compile
            ).loss
        loss.backward()
        return loss

    step()  # the compile and lazily made buffers: not the loss's cost
    if name == "vocab_compiled":
        for rows in (n // 3, n - 1):  # other token counts must reuse the compiled graph
            step(rows)
    graphs = counters["stats"]["unique_graphs"]
    baseline = _rss_kib("VmRSS")
    _reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    peak = _rss_kib("VmHWM")
    save_file(
        {
            "grad_hidden": student_hidden.grad.contiguous(),
            "grad_weight_rows": student_weight.grad[:4096].contiguous(),
        },
        grads_out,
    )
    return {
        "case": name,
        "time_s": min(times),
        "peak_mib": (peak - baseline) / 1024,
        "loss": float(loss),
        "graphs": graphs,
        "chunk": chunk_rows(v),
    }


def _timed_forward(student_hidden, student_weight, teacher_hidden, teacher_weight) -> float:
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        a = student_hidden @ student_weight.T
        b = teacher_hidden @ teacher_weight.T
        elapsed = time.perf_counter() - start
        del a, b
    return elapsed


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _run(name: str, n: int, h: int, v: int, repeats: int, out: str, env=None) -> dict:
    """One case in a fresh process; its JSON result."""
    cmd = [sys.executable, __file__, "--case", name, "--grads-out", out, "--repeats", str(repeats)]
    cmd += ["--n", str(n), "--h", str(h), "--v", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"case {name} (V={v}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_err(ours: dict, ref: dict, ours_grads: dict, ref_grads: dict) -> float:
    loss_err = abs(ours["loss"] - ref["loss"]) / abs(ref["loss"])
    return max([loss_err] + [rel_err(ours_grads[k], ref_grads[k]) for k in ref_grads])


def main_vocab(args) -> None:
    """Plain vs ours eager vs ours compiled at each vocabulary; a table, then one RESULT line."""
    from safetensors.torch import load_file

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    h, rows, errs, recompiles = args.h or 64, [], [], 0
    header = (
        "       V      N chunk | time s: plain  eager compiled | peak MiB: plain  eager compiled"
    )
    print(header + " | eager/plain: peak time | compiled/plain: peak time | graphs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for v in (int(x) for x in (args.v or VOCABS).split(",")):
            n = args.n or VOCAB_ELEMENTS // v
            r, g = {}, {}
            for name in VOCAB_CASES:
                out = os.path.join(tmp, f"{name}-{v}.safetensors")
                r[name.removeprefix("vocab_")] = _run(name, n, h, v, args.repeats, out, env)
                g[name.removeprefix("vocab_")] = load_file(out)
            for ours in ("eager", "compiled"):
                errs.append(_max_err(r[ours], r["plain"], g[ours], g["plain"]))
            recompiles += r["compiled"]["graphs"] - 1
            ratio = {
                (ours, m): r[ours][m] / r["plain"][m]
                for ours in ("eager", "compiled")
                for m in ("peak_mib", "time_s")
            }
            rows.append(ratio)
            t = [r[c]["time_s"] for c in ("plain", "eager", "compiled")]
            p = [r[c]["peak_mib"] for c in ("plain", "eager", "compiled")]
            print(
                f"{v:8d} {n:6d} {r['compiled']['chunk']:5d} | {t[0]:13.2f} {t[1]:6.2f} {t[2]:8.2f}"
                f" | {p[0]:15.0f} {p[1]:6.0f} {p[2]:8.0f}"
                f" | {ratio['eager', 'peak_mib']:16.2f} {ratio['eager', 'time_s']:4.2f}"
                f" | {ratio['compiled', 'peak_mib']:19.2f} {ratio['compiled', 'time_s']:4.2f}"
                f" | {r['compiled']['graphs']:6d}",
                flush=True,
            )
    figures = {
        f"{ours}_over_plain_{m.split('_')[0]}_max": max(row[ours, m] for row in rows)
        for ours in ("eager", "compiled")
        for m in ("peak_mib", "time_s")
    }
    figures["recompiles"] = recompiles
    figures["max_rel_err"] = max(errs)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"H={h}, fp32, {os.cpu_count()} cores, OMP_NUM_THREADS={threads}")
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in figures.items()))


def main_vs_trl(args) -> None:
    """Ours against TRL 1.16, plain PyTorch and the bare matmuls at one shape."""
    from safetensors.torch import load_file

    n, h, v = args.n or 2048, args.h or 896, int(args.v or 151936)
    results, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, label in CASES.items():
            if args.only and name not in args.only:
                continue
            out = os.path.join(tmp, f"{name}.safetensors")
            results[name] = _run(name, n, h, v, args.repeats, out)
            if os.path.exists(out):
                grads[name] = load_file(out)
            r = results[name]
            print(f"{label:62s} {r['time_s']:8.2f} s {r['peak_mib']:9.0f} MiB", flush=True)

    errs = {}
    for ours, ref in (
        ("ours_logits_fkl", "plain_fkl"),
        ("ours_logits_jsd", "plain_jsd"),
        ("ours_hidden_jsd", "plain_jsd"),
        ("ours_hidden_jsd_eager", "plain_jsd"),
        ("trl_gkd_jsd", "plain_jsd"),
    ):
        if ours not in grads or ref not in grads:
            continue
        loss_err = abs(results[ours]["loss"] - results[ref]["loss"]) / abs(results[ref]["loss"])
        g_err = max(rel_err(grads[ours][k], grads[ref][k]) for k in grads[ref])
        errs[ours] = max(loss_err, g_err)
        print(f"relative error {ours} vs {ref}: loss {loss_err:.2e}, gradients {g_err:.2e}")

    # (key, ours, peer, measure): a figure is printed when both cases ran (see --only).
    pairs = [
        ("mem_ratio", "ours_logits_jsd", "trl_gkd_jsd", "peak_mib"),
        ("time_ratio", "ours_logits_jsd", "trl_gkd_jsd", "time_s"),
        ("plain_mem_ratio", "ours_logits_jsd", "plain_jsd", "peak_mib"),
        ("plain_time_ratio", "ours_logits_jsd", "plain_jsd", "time_s"),
        ("chunked_mem_ratio", "ours_hidden_jsd", "trl_chunked_jsd", "peak_mib"),
        ("chunked_time_ratio", "ours_hidden_jsd", "trl_chunked_jsd", "time_s"),
        ("floor_ratio", "ours_hidden_jsd", "floor_online", "time_s"),
        ("compile_speedup", "ours_hidden_jsd_eager", "ours_hidden_jsd", "time_s"),
    ]
    figures = {
        key: results[a][measure] / results[b][measure]
        for key, a, b, measure in pairs
        if a in results and b in results
    }
    ours_errs = [v for k, v in errs.items() if k.startswith("ours")]
    if ours_errs:
        figures["max_rel_err"] = max(ours_errs)
    print(f"shape N={n} H={h} V={v}, fp32, {os.cpu_count()} cores")
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in figures.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="target tokens (default: see the module docstring)")
    parser.add_argument("--h", type=int, help="hidden size (default 64; --vs-trl 896)")
    parser.add_argument("--v", help=f"vocabularies, comma-separated (default {VOCABS})")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vs-trl", action="store_true", help="ours vs TRL 1.16 at one V")
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="--vs-trl: only these")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--grads-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        run = run_vocab_case if args.case in VOCAB_CASES else run_case
        print(json.dumps(run(args.case, args.n, args.h, int(args.v), args.repeats, args.grads_out)))
    elif args.vs_trl:
        main_vs_trl(args)
    else:
        main_vocab(args)


if __name__ == "__main__":
    main()
