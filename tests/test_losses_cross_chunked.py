"""losses.cross_chunked: the chunked hidden-state path equals the plain one that builds both
sides' logits whole (values and gradients), and holds only one chunk's logits at a time."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from potstill.losses.cross_chunked import chunked_cross_sums, cross_chunk_rows
from potstill.losses.cross_vocab import hybrid, uld, vocab_matches

N, H, V_S, V_T, H_T = 23, 8, 37, 53, 6


def _case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, requires_grad=True)
    weight = torch.randn(V_S, H, generator=gen, requires_grad=True)
    bias = torch.randn(V_S, generator=gen, requires_grad=True)
    labels = torch.randint(0, V_S, (N,), generator=gen)
    paired = torch.tensor([0, 1, 2, 5, 6, 9, 13, 14, 15, 16, 20, 22])
    teacher_hidden = torch.randn(len(paired), H_T, generator=gen)
    teacher_head = torch.randn(V_T, H_T, generator=gen) * 2
    return hidden, weight, bias, labels, paired, teacher_hidden @ teacher_head.T


def _soft_losses():
    student = {f"s{i}": i for i in range(V_S)}
    teacher = {f"s{i}" if i % 3 else f"t{i}": i for i in range(V_T)}
    match = vocab_matches(teacher, student)
    return {
        "uld": functools.partial(uld, temperature=2.0),
        "uld_top8": functools.partial(uld, top_k=8),
        "hybrid_jsd": functools.partial(hybrid, match=match, divergence="jsd", beta=0.3),
    }


@pytest.mark.parametrize("loss_name", ["uld", "uld_top8", "hybrid_jsd"])
@pytest.mark.parametrize("chunk", [1, 4, 7, 23, 64])
def test_chunked_equals_plain_values_and_gradients(loss_name, chunk):
    soft_loss = _soft_losses()[loss_name]
    hidden, weight, bias, labels, paired, teacher_logits = _case()
    logits = F.linear(hidden, weight, bias)
    plain_ce = F.cross_entropy(logits, labels, reduction="sum")
    plain_soft = soft_loss(logits[paired], teacher_logits, chunk_size=N).sum()
    plain_grads = torch.autograd.grad(plain_ce + 0.3 * plain_soft, (hidden, weight, bias))

    calls = []

    def teacher_rows(lo, hi):
        calls.append((lo, hi))
        return teacher_logits[lo:hi]

    ce, soft = chunked_cross_sums(
        hidden, weight, bias, labels, paired, teacher_rows, soft_loss, teacher_vocab=V_T,
        chunk_size=chunk,
    )  # fmt: skip
    grads = torch.autograd.grad(ce + 0.3 * soft, (hidden, weight, bias))
    assert ce.item() == pytest.approx(plain_ce.item(), rel=1e-6)
    assert soft.item() == pytest.approx(plain_soft.item(), rel=1e-5)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # every pair's teacher rows asked for, chunk by chunk, never all at once when chunked
    asked = sorted({pair for lo, hi in calls for pair in range(lo, hi)})
    assert asked == list(range(len(paired)))
    if chunk < N:
        assert max(hi - lo for lo, hi in calls) <= chunk < len(paired)


def test_no_pairs_gives_zero_soft_and_plain_ce():
    hidden, weight, bias, labels, _, _ = _case(1)
    none = torch.zeros(0, dtype=torch.long)

    def never(lo, hi):  # pragma: no cover - must not be called
        raise AssertionError("teacher rows asked for with no pairs")

    ce, soft = chunked_cross_sums(
        hidden, weight, bias, labels, none, never, _soft_losses()["uld"], teacher_vocab=V_T,
        chunk_size=5,
    )  # fmt: skip
    assert soft.item() == 0.0
    want = F.cross_entropy(F.linear(hidden, weight, bias), labels, reduction="sum")
    assert ce.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("paired", "message"),
    [
        (torch.tensor([0, 2, 2]), "strictly increasing"),
        (torch.tensor([3, 1]), "strictly increasing"),
        (torch.tensor([0, N]), f"outside the {N} student rows"),
        (torch.tensor([[0, 1]]), "1-d"),
    ],
)
def test_bad_pairs_are_refused(paired, message):
    hidden, weight, bias, labels, _, logits = _case()
    with pytest.raises(ValueError, match=message):
        chunked_cross_sums(
            hidden, weight, bias, labels, paired, lambda lo, hi: logits[lo:hi],
            _soft_losses()["uld"], teacher_vocab=V_T,
        )  # fmt: skip


def test_chunk_rows_for_the_kit_pair():
    # Qwen's 151,936 entries set the chunk: 2**29 / (4 * 151,936) -> 512, a quarter of it
    assert cross_chunk_rows(49_152, 151_936) == 128
    assert cross_chunk_rows(151_936, 49_152) == 128
    assert cross_chunk_rows(262_144, 49_152) == 128
    assert cross_chunk_rows(32_000, 32_000) == 1024
