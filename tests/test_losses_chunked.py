"""The fused chunked loss equals the plain one, in values and gradients, for every divergence and
teacher kind; and the loss normalises over the whole accumulation window."""

import warnings

import pytest
import torch

from potstill.losses import (
    DIVERGENCES,
    TeacherConfidence,
    TeacherHidden,
    TeacherLogits,
    TeacherTopK,
    chunked_kd_loss,
    count_target_tokens,
    fused,
    kd_loss,
)

from .conftest import DIVERGENCE_PARAMS as PARAMS

N, H, HT, V = 45, 16, 12, 64


def inputs(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    t_hidden, t_weight = torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 1, 7, 30]] = -100
    return hidden, weight, b, t_hidden, t_weight, labels


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden", "topk"])
def test_chunked_equals_plain(name, teacher_kind):
    hidden, weight, bias, t_hidden, t_weight, labels = inputs(bias=teacher_kind == "hidden")
    t_logits = t_hidden @ t_weight.T
    if teacher_kind == "logits":
        teacher = TeacherLogits(t_logits)
    elif teacher_kind == "hidden":
        teacher = TeacherHidden(t_hidden, t_weight)
    else:
        top = torch.log_softmax(t_logits / 1.5, -1).topk(8, -1)
        teacher = TeacherTopK(top.indices, top.values)
    kwargs = dict(divergence=name, temperature=1.5, kd_ratio=0.6, **PARAMS.get(name, {}))
    chunked = chunked_kd_loss(
        hidden, weight, labels, teacher, student_bias=bias, chunk_size=8, **kwargs
    )
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    plain = kd_loss(logits, labels, teacher, **kwargs)
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(
        grads(chunked.loss, [hidden, weight, bias]),
        grads(plain.loss, [hidden, weight, bias]),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert chunked.tokens == plain.tokens == 41
    assert chunked.ce_sum == pytest.approx(plain.ce_sum, rel=1e-5)
    assert chunked.soft_sum == pytest.approx(plain.soft_sum, rel=1e-5)


def test_plain_loss_matches_a_hand_computation():
    hidden, weight, _, t_hidden, t_weight, labels = inputs()
    logits, t_logits = hidden @ weight.T, t_hidden @ t_weight.T
    out = kd_loss(logits, labels, TeacherLogits(t_logits), temperature=2.0, kd_ratio=0.25)
    mask = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
    p = torch.softmax(t_logits[mask] / 2, -1)
    kl = (p * (p.log() - torch.log_softmax(logits[mask] / 2, -1))).sum()
    want = (0.75 * ce + 0.25 * 4.0 * kl) / mask.sum()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)


def test_dynamic_kd_ratio_is_identical_chunked_and_plain():
    hidden, weight, _, t_hidden, t_weight, labels = inputs(seed=1)
    teacher = TeacherHidden(t_hidden, t_weight)
    strategy = TeacherConfidence("entropy")
    chunked = chunked_kd_loss(hidden, weight, labels, teacher, kd_ratio=strategy, chunk_size=16)
    plain = kd_loss(
        hidden @ weight.T, labels, TeacherLogits(t_hidden @ t_weight.T), kd_ratio=strategy
    )
    torch.testing.assert_close(chunked.loss, plain.loss)
    assert chunked.kd_ratio_mean == pytest.approx(plain.kd_ratio_mean, rel=1e-5)
    assert 0 < plain.kd_ratio_mean < 1


def test_frozen_lm_head_gets_no_gradient_work():
    hidden, weight, _, t_hidden, t_weight, labels = inputs()
    frozen = weight.detach()
    out = chunked_kd_loss(hidden, frozen, labels, TeacherHidden(t_hidden, t_weight))
    out.loss.backward()
    assert hidden.grad is not None and frozen.grad is None


def test_one_batch_of_8_equals_8_micro_batches_of_1():
    """Sequences of different lengths: normalising per micro-batch would weight them unequally."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(V, H, generator=g).requires_grad_()
    t_weight = torch.randn(V, HT, generator=g)
    seqs = []
    for length in (3, 9, 1, 14, 6, 2, 11, 5):
        labels = torch.randint(0, V, (16,), generator=g)
        labels[length:] = -100  # padding
        seqs.append((torch.randn(16, H, generator=g), torch.randn(16, HT, generator=g), labels))
    window = sum(count_target_tokens(labels) for _, _, labels in seqs)

    whole = chunked_kd_loss(
        torch.stack([s[0] for s in seqs]),
        weight,
        torch.stack([s[2] for s in seqs]),
        TeacherHidden(torch.stack([s[1] for s in seqs]), t_weight),
        divergence="jsd",
        beta=0.5,
    )
    (whole_grad,) = torch.autograd.grad(whole.loss, weight)

    total = torch.zeros(())
    accumulated = torch.zeros_like(weight)
    for h, th, labels in seqs:
        micro = chunked_kd_loss(
            h,
            weight,
            labels,
            TeacherHidden(th, t_weight),
            divergence="jsd",
            beta=0.5,
            num_target_tokens=window,
        )
        (g_micro,) = torch.autograd.grad(micro.loss, weight)
        accumulated += g_micro
        total += micro.loss.detach()
    torch.testing.assert_close(total, whole.loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(accumulated, whole_grad, rtol=1e-5, atol=1e-7)


def test_all_masked_batch_contributes_zero():
    hidden, weight, _, t_hidden, t_weight, _ = inputs()
    labels = torch.full((N,), -100)
    out = chunked_kd_loss(
        hidden, weight, labels, TeacherHidden(t_hidden, t_weight), num_target_tokens=0
    )
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.tokens == 0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_backward_scales_with_the_upstream_gradient():
    hidden, weight, _, t_hidden, t_weight, labels = inputs()
    out = chunked_kd_loss(hidden, weight, labels, TeacherHidden(t_hidden, t_weight))
    (g1,) = torch.autograd.grad(out.loss, hidden, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * out.loss, hidden)
    torch.testing.assert_close(g3, 3.0 * g1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"kd_ratio": 1.5}, "kd_ratio must be in [0, 1], got 1.5"),
        ({"divergence": "kl"}, "unknown divergence 'kl'; choose one of forward_kl"),
        ({"divergence": "tvd", "beta": 0.5}, "divergence 'tvd' takes no parameters, got beta"),
        ({"divergence": "jsd", "beta": 2.0}, "beta must be in [0, 1], got 2.0"),
    ],
)
def test_bad_arguments(kwargs, message):
    hidden, weight, _, t_hidden, t_weight, labels = inputs()
    with pytest.raises(ValueError) as exc:
        chunked_kd_loss(hidden, weight, labels, TeacherHidden(t_hidden, t_weight), **kwargs)
    assert message in str(exc.value)


def test_vocab_mismatch_and_nan_teacher():
    hidden, weight, _, t_hidden, t_weight, labels = inputs()
    with pytest.raises(ValueError, match="the vocabularies differ"):
        chunked_kd_loss(hidden, weight, labels, TeacherHidden(t_hidden, t_weight[:-3]))
    t_logits = t_hidden @ t_weight.T
    t_logits[20, 5] = float("nan")
    with pytest.raises(
        ValueError, match=r"teacher logits hold NaN/inf, the first at index \(20, 5\)"
    ):
        chunked_kd_loss(hidden, weight, labels, TeacherLogits(t_logits), chunk_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_compiled_kernels_equal_eager(name):
    """torch.compile fuses the closed-form kernel; it must compute the same loss and gradients."""
    hidden, weight, _, t_hidden, t_weight, labels = inputs(seed=5)
    kwargs = dict(
        divergence=name, temperature=2.0, kd_ratio=0.7, chunk_size=16, **PARAMS.get(name, {})
    )
    teacher = TeacherHidden(t_hidden, t_weight)
    eager = chunked_kd_loss(hidden, weight, labels, teacher, compile=False, **kwargs)
    fused._compile_failed = False
    with warnings.catch_warnings():
        # A failed compile falls back to eager with a warning: make that a failure here.
        warnings.filterwarnings("error", message="torch.compile failed")
        compiled = chunked_kd_loss(hidden, weight, labels, teacher, compile=True, **kwargs)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(
        grads(compiled.loss, [hidden, weight]), grads(eager.loss, [hidden, weight]), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_step_strategies_are_passed_as_their_value():
    from potstill.losses import Fixed, Schedule

    hidden, weight, _, t_hidden, t_weight, labels = inputs()
    teacher = TeacherHidden(t_hidden, t_weight)
    with pytest.raises(ValueError, match=r"kd_ratio=schedule\(step=step\)"):
        chunked_kd_loss(hidden, weight, labels, teacher, kd_ratio=Schedule(0.0, 1.0, 10))
    fixed = chunked_kd_loss(hidden, weight, labels, teacher, kd_ratio=Fixed(0.3))
    number = chunked_kd_loss(hidden, weight, labels, teacher, kd_ratio=0.3)
    assert fixed.loss.item() == number.loss.item() and fixed.kd_ratio_mean == pytest.approx(0.3)


def test_bf16_student_and_teacher():
    hidden, weight, _, t_hidden, t_weight, labels = inputs()
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    teacher = TeacherHidden(t_hidden.bfloat16(), t_weight.bfloat16())
    out = chunked_kd_loss(h16, w16, labels, teacher, divergence="jsd", beta=0.5)
    out.loss.backward()
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    ref = kd_loss(
        (h16 @ w16.T).float(),
        labels,
        TeacherLogits(t_hidden.bfloat16() @ t_weight.bfloat16().T),
        divergence="jsd",
        beta=0.5,
    )
    torch.testing.assert_close(out.loss.float(), ref.loss, rtol=1e-4, atol=1e-5)


def test_custom_ignore_index_is_honoured_everywhere():
    """The default token count must use the caller's ignore_index, not -100."""
    hidden, weight, _, t_hidden, t_weight, labels = inputs()
    custom = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    teacher = TeacherHidden(t_hidden, t_weight)
    want = chunked_kd_loss(hidden, weight, labels, teacher)
    got = chunked_kd_loss(hidden, weight, custom, teacher, ignore_index=-1)
    assert got.tokens == want.tokens == 41
    torch.testing.assert_close(got.loss, want.loss)
    plain = kd_loss(
        hidden @ weight.T, custom, TeacherLogits(t_hidden @ t_weight.T), ignore_index=-1
    )
    torch.testing.assert_close(plain.loss, want.loss, rtol=1e-5, atol=1e-6)
