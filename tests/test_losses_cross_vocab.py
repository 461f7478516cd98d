"""Cross-vocabulary losses: ULD against a naive reference and closed forms, the hybrid loss
against the registry's same-vocabulary divergences, gradients, and chunked == one chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potstill.losses.cross_vocab import VocabMatch, hybrid, uld, uld_core, vocab_matches
from potstill.losses.registry import DIVERGENCES


def naive_uld(student_logits, teacher_logits, temperature=1.0, top_k=None) -> list[float]:
    """One position at a time, with Python lists: sort, pad with zeros, sum |differences|."""
    out = []
    for s_row, t_row in zip(student_logits.tolist(), teacher_logits.tolist(), strict=True):
        q = np.exp(np.array(s_row, dtype=np.float64) / temperature)
        p = np.exp(np.array(t_row, dtype=np.float64) / temperature)
        q, p = sorted(q / q.sum(), reverse=True), sorted(p / p.sum(), reverse=True)
        width = max(len(p), len(q))
        q, p = q + [0.0] * (width - len(q)), p + [0.0] * (width - len(p))
        tail = 0.0
        if top_k is not None:  # the mass past rank k, one number a side
            tail = abs(sum(p[top_k:]) - sum(q[top_k:]))
            q, p = q[:top_k], p[:top_k]
        out.append(sum(abs(a - b) for a, b in zip(p, q, strict=True)) + tail)
    return out


def logits_pair(rows=10, student_vocab=7, teacher_vocab=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, student_vocab, generator=generator) * 2
    teacher = torch.randn(rows, teacher_vocab, generator=generator) * 2
    return student, teacher


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("top_k", [None, 1, 4, 50])
def test_uld_matches_a_naive_reference(temperature, top_k):
    student, teacher = logits_pair()
    got = uld(student, teacher, temperature=temperature, top_k=top_k)
    want = naive_uld(student, teacher, temperature, top_k)
    assert got.shape == (10,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    # and with the vocabularies the other way round (student larger than teacher)
    got = uld(teacher, student, temperature=temperature, top_k=top_k)
    assert np.allclose(got.numpy(), naive_uld(teacher, student, temperature, top_k), atol=1e-6)


def test_uld_closed_forms():
    # p = [1, 0], q = [0.5, 0.5]: |1 - 0.5| + |0 - 0.5| = 1
    assert float(uld(torch.zeros(1, 2), torch.tensor([[0.0, -1e4]]))[0]) == pytest.approx(1.0)
    # token identity does not matter: sorted p = [.7, .2, .1], sorted q = [.6, .3, .1] -> 0.2
    p, q = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.1, 0.6, 0.3]])
    assert float(uld(q.log(), p.log())[0]) == pytest.approx(0.2, abs=1e-6)
    # vocab sizes differ: q = [.6, .4] is padded to [.6, .4, 0] against p = [.5, .3, .2] -> 0.4
    p, q = torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0.6, 0.4]])
    assert float(uld(q.log(), p.log())[0]) == pytest.approx(0.4, abs=1e-6)
    assert float(uld_core(q, p)[0]) == pytest.approx(0.4, abs=1e-6)
    # top_k = 1: the largest probabilities, |.5 - .6|, and the rest as one mass, |.5 - .4|
    assert float(uld(q.log(), p.log(), top_k=1)[0]) == pytest.approx(0.2, abs=1e-6)
    # disjoint certainties are identical under ULD: both one-hot, whatever the token
    assert float(uld(torch.tensor([[-1e4, 0.0, -1e4]]), torch.tensor([[0.0, -1e4]]))[0]) == 0.0


def test_uld_is_zero_for_permuted_identical_distributions():
    student, _ = logits_pair(rows=6, student_vocab=9)
    teacher = student[:, torch.randperm(9, generator=torch.Generator().manual_seed(3))]
    assert float(uld(student, teacher).abs().max()) < 1e-6
    # padding with tokens of zero probability changes nothing either
    padded = torch.cat([teacher, torch.full((6, 4), -1e4)], dim=-1)
    assert float(uld(student, padded).abs().max()) < 1e-6


def test_uld_top_k_is_a_lower_bound_and_exact_at_full_width():
    student, teacher = logits_pair(rows=20)
    full = uld(student, teacher)
    assert torch.equal(uld(student, teacher, top_k=11), full)
    assert bool((uld(student, teacher, top_k=3) <= full + 1e-6).all())
    # a teacher with mass on 3 tokens only (a top-3 cache): top_k = 3 is the full value
    cached = teacher.clone()
    cached[cached < cached.topk(3, dim=-1).values[:, -1:]] = -1e4
    exact = uld(student, cached)
    assert torch.allclose(uld(student, cached, top_k=3), exact, atol=1e-6)
    assert bool((uld(student, cached, top_k=2) < exact - 1e-4).any())
    assert bool((full > 0).all()) and bool((full <= 2).all())


def test_uld_gradient_matches_finite_differences():
    student, teacher = logits_pair(rows=3, student_vocab=4, teacher_vocab=5)
    student = student.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: uld(s, teacher.double()), (student,))


def tiny_vocabs():
    teacher_vocab = {"a": 0, "b": 1, "c": 2, "e": 3}
    student_vocab = {"b": 0, "a": 1, "d": 2, "e": 3, "f": 4}
    return teacher_vocab, student_vocab


def test_vocab_matches_is_an_exact_one_to_one_string_map():
    match = vocab_matches(*tiny_vocabs())
    assert match.teacher_ids.tolist() == [0, 1, 3] and match.student_ids.tolist() == [1, 0, 3]
    assert len(match) == 3
    # one id spelled two ways on a side: each id is used once, lowest teacher id first
    match = vocab_matches({"x": 0, "y": 1}, {"x": 5, "y": 5})
    assert match.teacher_ids.tolist() == [0] and match.student_ids.tolist() == [5]
    assert len(vocab_matches({"x": 0}, {"z": 0})) == 0


def test_hybrid_by_hand_on_tiny_vocabularies():
    match = vocab_matches(*tiny_vocabs())
    p = np.array([0.4, 0.3, 0.2, 0.1])  # teacher a b c e
    q = np.array([0.25, 0.15, 0.1, 0.3, 0.2])  # student b a d e f
    # matched: a, b, e -> teacher [.4, .3, .1], student [.15, .25, .3]; renormalised
    p_m, q_m = np.array([0.4, 0.3, 0.1]) / 0.8, np.array([0.15, 0.25, 0.3]) / 0.7
    kl = float(np.sum(p_m * np.log(p_m / q_m)))
    # unmatched: teacher c [.2] against student d, f [.1, .2] sorted [.2, .1]: |.2-.2| + |0-.1|
    rest = 0.1
    got = hybrid(
        torch.tensor(np.log(q)[None], dtype=torch.float32),
        torch.tensor(np.log(p)[None], dtype=torch.float32),
        match,
        matched_weight=0.7,
        unmatched_weight=2.0,
    )
    assert float(got[0]) == pytest.approx(0.7 * kl + 2.0 * rest, abs=1e-6)
    assert float(got[0]) != pytest.approx(0.7 * kl, abs=1e-3)  # the ULD part counted


@pytest.mark.parametrize(
    ("divergence", "params"), [("forward_kl", {}), ("jsd", {}), ("jsd", {"beta": 0.2})]
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hybrid_with_one_vocabulary_is_the_registry_divergence(divergence, params, temperature):
    student, teacher = logits_pair(rows=12, student_vocab=13, teacher_vocab=13, seed=5)
    identity = VocabMatch(torch.arange(13), torch.arange(13))
    got = hybrid(
        student, teacher, identity, divergence=divergence, temperature=temperature, **params
    )
    want = DIVERGENCES[divergence](student, teacher, temperature=temperature, **params)
    assert float((got - want).abs().max()) < 1e-6
    assert float(want.min()) > 1e-3  # a real difference between the two distributions


def test_hybrid_without_matches_is_uld():
    student, teacher = logits_pair(rows=5)
    none = VocabMatch(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert torch.allclose(hybrid(student, teacher, none), uld(student, teacher), atol=1e-7)


@pytest.mark.parametrize("loss", ["uld", "hybrid"])
@pytest.mark.parametrize("chunk_size", [3, None])
def test_gradients_reach_the_student_only(loss, chunk_size):
    student, teacher = logits_pair()
    student.requires_grad_()
    teacher.requires_grad_()
    match = VocabMatch(torch.tensor([0, 2, 5]), torch.tensor([4, 1, 0]))
    if loss == "uld":
        value = uld(student, teacher, temperature=2.0, chunk_size=chunk_size)
    else:
        value = hybrid(student, teacher, match, divergence="jsd", chunk_size=chunk_size)
    value.sum().backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 1e-3
    # softmax gradients sum to zero over each row's vocabulary
    assert float(student.grad.sum(-1).abs().max()) < 1e-6


@pytest.mark.parametrize("loss", ["uld", "uld_top_k", "hybrid"])
def test_chunked_equals_one_chunk(loss):
    student, teacher = logits_pair(rows=23, student_vocab=40, teacher_vocab=57, seed=2)
    student = student.reshape(23, 1, 40)  # leading dims are kept
    teacher = teacher.reshape(23, 1, 57)
    match = VocabMatch(torch.arange(0, 30, 3), torch.arange(10) * 4 % 40)

    def run(chunk_size):
        s = student.clone().requires_grad_()
        kwargs = {"temperature": 1.5, "chunk_size": chunk_size}
        if loss == "hybrid":
            out = hybrid(s, teacher, match, divergence="reverse_kl", top_k=8, **kwargs)
        else:
            out = uld(s, teacher, top_k=5 if loss == "uld_top_k" else None, **kwargs)
        (out * torch.linspace(0.5, 2.0, 23).reshape(23, 1)).sum().backward()
        return out.detach(), s.grad

    whole_value, whole_grad = run(1000)
    for chunk_size in (1, 4, 7):
        value, grad = run(chunk_size)
        assert value.shape == (23, 1)
        assert float((value - whole_value).abs().max()) < 1e-6
        assert float((grad - whole_grad).abs().max()) < 1e-6


def test_half_precision_inputs_are_upcast():
    student, teacher = logits_pair()
    got = uld(student.bfloat16(), teacher.bfloat16(), chunk_size=4)
    assert got.dtype == torch.float32
    want = naive_uld(student.bfloat16().float(), teacher.bfloat16().float())
    assert np.allclose(got.numpy(), want, atol=1e-6)


def test_bad_arguments_say_what_to_do():
    student, teacher = logits_pair()
    with pytest.raises(ValueError, match="pair position for position"):
        uld(student, teacher[:5])
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        uld(student, teacher, top_k=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        uld(student, teacher, chunk_size=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        uld(student, teacher, temperature=0.0)
    teacher[6, 2] = float("nan")
    with pytest.raises(ValueError, match=r"the first at index \(6, 2\)"):
        uld(student, teacher, chunk_size=4)
    match = VocabMatch(torch.tensor([0, 20]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="teacher ids outside the teacher logits' 11 entries"):
        hybrid(student, teacher, match)
    with pytest.raises(ValueError, match="unmatched_weight must be a number >= 0"):
        hybrid(
            student, teacher, VocabMatch(torch.tensor([0]), torch.tensor([0])), unmatched_weight=-1
        )
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        hybrid(student, teacher, VocabMatch(torch.tensor([0]), torch.tensor([0])), divergence="kl")


@pytest.mark.slow
def test_qwen_and_smollm2_vocabularies_share_many_exact_strings():
    from potstill.models import load_tokenizer

    qwen = load_tokenizer("qwen2.5-coder-1.5b-instruct").get_vocab()
    smol = load_tokenizer("smollm2-135m-instruct").get_vocab()
    match = vocab_matches(qwen, smol)
    qwen_by_id = {i: t for t, i in qwen.items()}
    smol_by_id = {i: t for t, i in smol.items()}
    pairs = zip(match.teacher_ids.tolist(), match.student_ids.tolist(), strict=True)
    assert all(qwen_by_id[t] == smol_by_id[s] for t, s in pairs)
    assert qwen["Ġteacher"] in match.teacher_ids.tolist()
    assert len(match) == 39_237  # of SmolLM2's 49,152 (pinned kit files: an exact count)
