"""Divergences, weighting and reduction against closed forms and direct float64 computations."""

import math

import pytest
import torch

from potstill.losses import (
    DIVERGENCES,
    Balance,
    Fixed,
    Schedule,
    TeacherConfidence,
    forward_kl,
    jsd,
    mix,
    normalise,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    sparse_divergence,
    tvd,
)

from .conftest import DIVERGENCE_PARAMS as PARAMS


def logits_pair(shape=(3, 5, 11), seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale


def reference(name, s, t, temperature=1.0, **params):
    """Direct float64 formulas from the definitions."""
    q = torch.softmax(s.double() / temperature, -1)
    p = torch.softmax(t.double() / temperature, -1)

    def kl(a, b):
        return (a * (a / b).log()).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        b = params["beta"]
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    if name == "skew_forward_kl":
        a = params["alpha"]
        return kl(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        a = params["alpha"]
        return kl(q, a * q + (1 - a) * p)
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_float64_definition(name, temperature):
    s, t = logits_pair()
    got = DIVERGENCES[name](s, t, temperature=temperature, **PARAMS.get(name, {}))
    want = reference(name, s, t, temperature, **PARAMS.get(name, {}))
    assert got.shape == s.shape[:-1] and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_identical_logits_give_zero_and_random_ones_are_positive(name):
    s, t = logits_pair()
    params = PARAMS.get(name, {})
    assert DIVERGENCES[name](s, s.clone(), **params).abs().max() < 1e-6
    assert (DIVERGENCES[name](s, t, **params) > 0).all()


def test_computed_in_float32_whatever_the_input_dtype():
    s, t = logits_pair()
    got = forward_kl(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, forward_kl(s.bfloat16().float(), t.bfloat16().float()))


def test_jsd_limits():
    s, t = logits_pair(seed=1)
    assert jsd(s, t, beta=0.0).abs().max() == 0  # m = q: both terms vanish
    assert jsd(s, t, beta=1.0).abs().max() == 0  # m = p
    # TRL returns KL(p‖q) at β = 0 and KL(q‖p) at β = 1: the limits of jsd/β and jsd/(1 − β).
    # The next term is β/2·χ², so take β tiny, in float64.
    s64, t64, eps = s.double(), t.double(), 1e-9
    torch.testing.assert_close(
        jsd(s64, t64, beta=eps) / eps, forward_kl(s64, t64), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        jsd(s64, t64, beta=1 - eps) / eps, reverse_kl(s64, t64), rtol=1e-5, atol=0
    )
    symmetric = jsd(s, t, beta=0.5)
    torch.testing.assert_close(symmetric, jsd(t, s, beta=0.5))
    assert (symmetric <= math.log(2) + 1e-6).all()  # the Jensen-Shannon bound


def test_skew_kls_at_zero_are_the_plain_kls_and_tvd_is_bounded():
    s, t = logits_pair(seed=2)
    torch.testing.assert_close(skew_forward_kl(s, t, alpha=0.0), forward_kl(s, t))
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))
    assert skew_forward_kl(s, t, alpha=1.0).abs().max() < 1e-6
    assert (tvd(s, t) <= 1).all()


def test_trl_agrees_inside_the_open_interval():
    gkd = pytest.importorskip("trl.experimental.gkd")
    s, t = logits_pair(shape=(2, 4, 9), seed=3)
    labels = torch.zeros(2, 4, dtype=torch.long)
    trl = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=0.3, temperature=2.0)
    ours = jsd(s, t, beta=0.3, temperature=2.0).sum() / 8
    torch.testing.assert_close(ours, trl, rtol=1e-5, atol=1e-7)
    trl_end = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=0.0)
    torch.testing.assert_close(forward_kl(s, t).sum() / 8, trl_end, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, t: forward_kl(s, t[..., :-1]), "differ in shape; the vocabularies differ"),
        (lambda s, t: forward_kl(s, t[:1]), "differ in shape; align the teacher's"),
        (lambda s, t: forward_kl(s, t, temperature=0.0), "temperature must be > 0, got 0.0"),
        (lambda s, t: jsd(s, t, beta=1.5), "beta must be in [0, 1], got 1.5"),
        (lambda s, t: skew_forward_kl(s, t, alpha=-0.1), "alpha must be in [0, 1], got -0.1"),
    ],
)
def test_bad_input_messages(call, message):
    s, t = logits_pair()
    with pytest.raises(ValueError) as exc:
        call(s, t)
    assert message in str(exc.value)


def test_nan_in_teacher_logits_says_where():
    s, t = logits_pair()
    t[1, 2, 7] = float("nan")
    t[2, 0, 0] = float("inf")
    with pytest.raises(
        ValueError,
        match=r"teacher logits hold NaN/inf, the first at index \(1, 2, 7\)",
    ):
        reverse_kl(s, t)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tail", ["bucket", "renormalise"])
def test_sparse_with_k_equal_v_is_dense(name, tail):
    s, t = logits_pair()
    log_p = torch.log_softmax(t / 2.0, -1)
    top = log_p.topk(log_p.shape[-1], -1)
    got = sparse_divergence(
        s,
        top.indices,
        top.values,
        divergence=name,
        temperature=2.0,
        tail=tail,
        **PARAMS.get(name, {}),
    )
    want = DIVERGENCES[name](s, t, temperature=2.0, **PARAMS.get(name, {}))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sparse_bucket_is_a_lower_bound_and_tail_mass_counts():
    s, t = logits_pair(scale=1.0)
    log_p = torch.log_softmax(t, -1)
    top = log_p.topk(3, -1)
    sparse = sparse_divergence(s, top.indices, top.values)
    assert (sparse <= forward_kl(s, t) + 1e-6).all()  # data-processing inequality
    # Renormalising forgets the tail: a student that matches the top-3 shape but leaks mass is
    # penalised by the bucket and not by renormalisation.
    leak = torch.full_like(s, 5.0).scatter(-1, top.indices, top.values)
    assert (sparse_divergence(leak, top.indices, top.values, tail="renormalise") < 1e-5).all()
    assert (sparse_divergence(leak, top.indices, top.values, tail="bucket") > 0.1).all()


def test_sparse_bad_input():
    s, t = logits_pair()
    top = torch.log_softmax(t, -1).topk(4, -1)
    with pytest.raises(ValueError, match="k = 12 is larger than the vocabulary \\(11\\)"):
        sparse_divergence(s, torch.zeros(3, 5, 12, dtype=torch.long), torch.zeros(3, 5, 12))
    bad = top.values.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"teacher log-probs hold NaN/inf, the first at index \(0, 1, 2\)",
    ):
        sparse_divergence(s, top.indices, bad)
    with pytest.raises(ValueError, match="teacher ids must lie in \\[0, 11\\)"):
        sparse_divergence(s, top.indices + 100, top.values)
    with pytest.raises(ValueError, match="tail must be one of bucket, renormalise"):
        sparse_divergence(s, top.indices, top.values, tail="drop")


def test_mix_applies_t_squared_once():
    ce, soft = torch.tensor([2.0]), torch.tensor([0.5])
    assert mix(ce, soft, 0.25, temperature=2.0).item() == pytest.approx(0.75 * 2.0 + 0.25 * 4 * 0.5)


def test_normalise_all_masked_contributes_zero_without_nan():
    per_token = torch.tensor([float("nan"), 1.0], requires_grad=True)
    out = normalise(per_token, torch.tensor([False, False]), 0)
    out.backward()
    assert out.item() == 0.0 and torch.equal(per_token.grad, torch.zeros(2))


def test_fixed_and_schedule():
    assert Fixed(0.3)() == 0.3
    linear = Schedule(0.2, 1.0, total_steps=100)
    assert [linear(step=s) for s in (0, 50, 100, 200)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    cosine = Schedule(0.0, 1.0, total_steps=100, shape="cosine")
    assert [cosine(step=s) for s in (0, 25, 50, 100)] == pytest.approx([0, 0.1464466, 0.5, 1.0])
    assert cosine.last_alpha == 1.0
    with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\], got 2"):
        Fixed(2)


def test_teacher_confidence_trusts_the_teacher_where_it_is_sure_and_right():
    # Token 0: the teacher is sure of the gold token. Token 1: it puts ~0 on the gold token.
    log_p = torch.log_softmax(torch.tensor([[20.0, 0.0, 0.0], [20.0, 0.0, 0.0]]), -1)
    labels = torch.tensor([0, 2])
    alpha = TeacherConfidence("gold")(teacher_log_probs=log_p, labels=labels)
    assert alpha[0] > 0.999 and alpha[1] < 1e-8
    entropy = TeacherConfidence("entropy")
    uniform = torch.log_softmax(torch.zeros(1, 3), -1)
    assert entropy(teacher_log_probs=uniform, labels=torch.tensor([0])).item() == pytest.approx(
        0, abs=1e-6
    )
    assert entropy(teacher_log_probs=log_p, labels=labels).min() > 0.99
    floored = TeacherConfidence("gold", floor=0.1, ceil=0.9)(teacher_log_probs=log_p, labels=labels)
    assert floored.tolist() == pytest.approx([0.9, 0.1])


def test_teacher_confidence_on_a_sparse_teacher():
    ids = torch.tensor([[0, 1], [0, 1]])
    log_probs = torch.log(torch.tensor([[0.7, 0.2], [0.7, 0.2]]))
    alpha = TeacherConfidence("gold")(
        teacher_log_probs=log_probs, labels=torch.tensor([1, 5]), teacher_ids=ids, vocab_size=10
    )
    assert alpha.tolist() == pytest.approx([0.2, 0.0])  # gold outside the top k: no trust


def test_balance_equalises_contributions():
    balance = Balance(share=0.5, momentum=0.0)
    assert balance() == 0.5  # nothing seen yet
    balance.update(ce_mean=2.0, soft_mean=0.002)  # 1000x apart, as EasyDistill users saw
    alpha = balance()
    assert alpha * 0.002 == pytest.approx((1 - alpha) * 2.0)
    assert balance.last_alpha == alpha
    quarter = Balance(share=0.25, momentum=0.0)
    quarter.update(ce_mean=1.0, soft_mean=1.0)
    assert quarter() == pytest.approx(0.25)
