"""The fused loss's chunks: sized from the whole working set for any vocabulary, one shape per
(chunk, V) when compiled (the last chunk padded with zero-weight rows), eager under plain."""

import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from potstill.losses import (
    TeacherConfidence,
    TeacherHidden,
    TeacherLogits,
    chunk_rows,
    chunked_kd_loss,
    fused,
    kd_loss,
)
from potstill.losses.chunked import CHUNK_BUDGET, ROW_BUFFERS

from .conftest import DIVERGENCE_PARAMS as PARAMS


@pytest.mark.parametrize(
    ("vocab", "rows"),
    [(32000, 640), (49152, 416), (128256, 160), (151936, 128), (262144, 64)],
)
def test_chunk_rows_fill_the_budget_for_any_vocabulary(vocab, rows):
    """rows = ⌊2³⁰ / (V · 4 B · 13 buffers)⌋ rounded down to a multiple of 16."""
    assert chunk_rows(vocab) == rows
    assert rows * vocab * 4 * ROW_BUFFERS <= CHUNK_BUDGET
    assert (rows + 16) * vocab * 4 * ROW_BUFFERS > CHUNK_BUDGET  # the most that fit


def test_chunk_rows_floor_ceiling_and_budget():
    assert chunk_rows(151936, buffers=1, budget_bytes=1 << 29) == 880  # ⌊883.4⌋ to 16s
    assert chunk_rows(32000, budget_bytes=1 << 28) == 160
    assert chunk_rows(10**7) == 16  # a chunk never gets thinner than 16 rows
    assert chunk_rows(64) == 4096  # nor taller than 4096 (tiny vocabularies)


def inputs(n, h=8, v=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).requires_grad_()
    bias = (torch.randn(v, generator=g) * 0.1).requires_grad_()
    teacher = TeacherHidden(torch.randn(n, 6, generator=g), torch.randn(v, 6, generator=g))
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 3, n - 1]] = -100  # the last chunk's last row too
    return hidden, weight, bias, teacher, labels


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def spy_kernels(monkeypatch):
    """Shapes the compiled and eager kernels see; "compiled" runs the eager kernel, so the padded
    path is exercised without a C++ compiler."""
    seen = {"compiled": [], "eager": []}
    eager = fused.dense_chunk

    def run(kind):
        def kernel(*args):
            seen[kind].append(tuple(args[0].shape))
            return eager(*args)

        return kernel

    monkeypatch.setattr(fused, "_compile_failed", False)
    monkeypatch.setattr(fused, "compiled_dense_chunk", lambda: run("compiled"))
    monkeypatch.setattr(fused, "dense_chunk", run("eager"))
    return seen


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("n", [37, 64, 100])
def test_padded_chunks_equal_unpadded_and_plain(monkeypatch, name, n):
    """N not a multiple of the chunk (37, 100) or one (64): padding changes nothing."""
    seen = spy_kernels(monkeypatch)
    hidden, weight, bias, teacher, labels = inputs(n)
    kwargs = dict(divergence=name, temperature=2.0, kd_ratio=0.6, **PARAMS.get(name, {}))
    tensors = [hidden, weight, bias]

    padded = chunked_kd_loss(
        hidden, weight, labels, teacher, student_bias=bias, chunk_size=32, compile=True, **kwargs
    )
    assert seen["compiled"] and set(seen["compiled"]) == {(32, 96)} and not seen["eager"]
    unpadded = chunked_kd_loss(
        hidden, weight, labels, teacher, student_bias=bias, chunk_size=32, compile=False, **kwargs
    )
    assert seen["eager"][-1][0] == n % 32 or n % 32 == 0  # the eager tail stays short
    t_logits = teacher.hidden @ teacher.weight.T
    plain = kd_loss(hidden @ weight.T + bias, labels, TeacherLogits(t_logits), **kwargs)
    got = grads(padded.loss, tensors)
    for reference in (unpadded, plain):
        torch.testing.assert_close(padded.loss, reference.loss, rtol=1e-5, atol=1e-5)
        for g, want in zip(got, grads(reference.loss, tensors), strict=True):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
        assert padded.tokens == reference.tokens == n - 3
        assert padded.ce_sum == pytest.approx(reference.ce_sum, rel=1e-5)
        assert padded.soft_sum == pytest.approx(reference.soft_sum, rel=1e-5)


def test_padded_rows_never_reach_a_dynamic_kd_ratio(monkeypatch):
    spy_kernels(monkeypatch)
    hidden, weight, _, teacher, labels = inputs(45)
    strategy = TeacherConfidence("entropy")
    kwargs = dict(kd_ratio=strategy, chunk_size=32)
    padded = chunked_kd_loss(hidden, weight, labels, teacher, compile=True, **kwargs)
    eager = chunked_kd_loss(hidden, weight, labels, teacher, compile=False, **kwargs)
    torch.testing.assert_close(padded.loss, eager.loss, rtol=1e-6, atol=1e-7)
    assert padded.kd_ratio_mean == pytest.approx(eager.kd_ratio_mean, rel=1e-6)


def test_eager_chunks_hold_at_most_half_the_batch(monkeypatch):
    seen = spy_kernels(monkeypatch)
    hidden, weight, _, teacher, labels = inputs(45)
    chunked_kd_loss(hidden, weight, labels, teacher, compile=False)
    assert seen["eager"] == [(23, 96), (22, 96)]


def test_a_failed_compile_redoes_the_call_eager(monkeypatch):
    seen = spy_kernels(monkeypatch)

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused, "compiled_dense_chunk", lambda: broken)
    hidden, weight, _, teacher, labels = inputs(45)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError\)"):
        out = chunked_kd_loss(hidden, weight, labels, teacher, compile=True)
    assert fused.compile_failed()
    assert seen["eager"] == [(23, 96), (22, 96)]  # eager-sized, not padded to 4,096 rows
    want = chunked_kd_loss(hidden, weight, labels, teacher, compile=False)
    torch.testing.assert_close(out.loss, want.loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls go eager at once, silently
        chunked_kd_loss(hidden, weight, labels, teacher, compile=True)


def _peak_mib(step) -> float:
    """The process's resident high-water mark during `step()`, above what it held before."""

    def kib(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(field)

    step()  # warm up: lazily made buffers and code are not the loss's memory
    base = kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    return (kib("VmHWM") - base) / 1024


def measure_peaks() -> None:
    """Run in a fresh process (see below): prints {"plain": MiB, "eager": MiB, "buffer": MiB}."""
    n, h, v = 512, 64, 32000
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    teacher = TeacherLogits(
        torch.randn(n, h, generator=g) @ (torch.randn(v, h, generator=g) * h**-0.5).T
    )

    def plain():
        hidden.grad = weight.grad = None
        kd_loss(hidden @ weight.T, labels, teacher).loss.backward()

    def eager():
        hidden.grad = weight.grad = None
        chunked_kd_loss(hidden, weight, labels, teacher, compile=False).loss.backward()

    peaks = {"plain": _peak_mib(plain), "eager": _peak_mib(eager), "buffer": n * v * 4 / 2**20}
    print(json.dumps(peaks))


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM"
)
def test_eager_peak_memory_stays_under_plain():
    """512 target tokens of a 32k vocabulary: one [512, V] buffer is 62.5 MiB. The old default
    put all 512 rows in one eager chunk, which holds 9 such buffers against plain's 7 (peak
    ~1.3x plain); two chunks of 256 hold ~5.

    Measured in a fresh process whose glibc maps every buffer of 64 KiB or more on its own, so
    that freed memory leaves the resident set at once and a reused heap cannot hide a peak."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    code = "from tests.test_losses_chunk_size import measure_peaks; measure_peaks()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, killed whole on a timeout
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert proc.returncode == 0
    peaks = json.loads(out.strip().splitlines()[-1])
    assert peaks["plain"] > 6 * peaks["buffer"]  # the measurement sees plain's [N, V] buffers
    assert peaks["eager"] < 0.8 * peaks["plain"], peaks


@pytest.mark.slow
def test_compiled_loss_compiles_once_for_any_token_count(monkeypatch):
    """100, 300 and 700 target tokens in chunks of 256 (the tails padded): one graph."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fused, "_compile_failed", False)
    torch._dynamo.reset()
    counters.clear()
    outs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (100, 300, 700):
            hidden, weight, _, teacher, labels = inputs(n, h=16, v=1000, seed=n)
            kwargs = dict(divergence="jsd", beta=0.5, temperature=2.0, chunk_size=256)
            compiled = chunked_kd_loss(hidden, weight, labels, teacher, compile=True, **kwargs)
            outs.append((compiled, chunked_kd_loss(hidden, weight, labels, teacher, **kwargs)))
    if fused.compile_failed():
        pytest.skip(f"torch.compile does not work here: {[str(w.message) for w in caught]}")
    assert counters["stats"]["unique_graphs"] == 1
    for compiled, eager in outs:
        torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
        assert not math.isnan(compiled.kd_ratio_mean)
