"""Benchmark: distillation loss forward + backward including the lm_head, fp32 on CPU.

    python benchmarks/kd_loss.py                 # N=2048, H=896, V=151936 (Qwen2.5), ~10 min
    python benchmarks/kd_loss.py --n 256 --repeats 1   # a quick look

Each case runs in a fresh process: peak memory is the process's high-water mark above what the
inputs already hold (reset through /proc/self/clear_refs), time is the best of `--repeats` runs.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--h", type=int, default=896)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="run only these cases")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--grads-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        print(json.dumps(run_case(args.case, args.n, args.h, args.v, args.repeats, args.grads_out)))
        return

    from safetensors.torch import load_file

    results, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, label in CASES.items():
            if args.only and name not in args.only:
                continue
            out = os.path.join(tmp, f"{name}.safetensors")
            cmd = [
                sys.executable,
                __file__,
                "--case",
                name,
                "--n",
                str(args.n),
                "--h",
                str(args.h),
                "--v",
                str(args.v),
                "--repeats",
                str(args.repeats),
                "--grads-out",
                out,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"case {name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
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
    print(f"shape N={args.n} H={args.h} V={args.v}, fp32, {os.cpu_count()} cores")
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
