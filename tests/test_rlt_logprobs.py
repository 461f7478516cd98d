"""The batched RLT forward (rlt/logprobs.py) on tiny random models: the same log-probs as a plain
full forward, whichever way the rows are clustered, bucketed and chunked (seconds, CPU)."""

from __future__ import annotations

import pytest
import torch

from potstill.rlt import RewardConfig, RLTModels, Sample, logprobs, reward_batch, reward_per_sample
from potstill.rlt.logprobs import (
    common_prefix,
    gather_logprobs,
    length_buckets,
    prefix_clusters,
    target_logprobs,
)

from .conftest import build_model, build_tokenizer

QUESTIONS = [
    "What is 17 + 25? Let's think step by step.",
    "Calculate 5 - 3 - 6. First add, then subtract.",
    "What is 9 + 8? The answer is the teacher's explanation.",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def models(tok) -> RLTModels:
    teacher, student = build_model(tok, seed=5), build_model(tok, seed=6)
    return RLTModels(
        teacher, tok, student, tok, teacher_system_prompt=None, student_system_prompt=None
    )


def plain_logprobs(logits: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.log_softmax(logits.double() / tau, -1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("head", ["linear", "bias", "softcap", "module"])
def test_target_logprobs_equals_log_softmax(head):
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 50, bias=head == "bias")
    hidden, targets = torch.randn(11, 16) * 3, torch.randint(0, 50, (11,))
    module = torch.nn.Sequential(lm_head) if head == "module" else lm_head  # not a plain Linear
    cap = 5.0 if head == "softcap" else None
    got = target_logprobs(hidden, module, targets, temperature=0.7, chunk=4, softcap=cap)
    logits = lm_head(hidden)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    assert got.dtype == torch.float32 and got.shape == (11,)
    torch.testing.assert_close(
        got.double(), plain_logprobs(logits, targets, 0.7), atol=1e-5, rtol=0
    )


def test_prefix_clusters_pick_the_runs_that_skip_most():
    a = list(range(40))
    rows = [a + [1, 2], [7] + a, a + [3], a[:30] + [9, 9], [7] + a + [5], [8, 8, 8]]
    clusters, alone = prefix_clusters(rows, min_shared=16)
    found = sorted((sorted(idx), shared) for idx, shared in clusters)
    # rows 0 and 2 alone share 40 tokens (40 skipped); with row 3 the run shares 30, skipped
    # twice (60): the run of three wins; rows 1 and 4 share 40, capped so row 1 keeps a token
    assert found == [([0, 2, 3], 30), ([1, 4], 40)] and alone == [5]
    assert common_prefix([[1, 2], [1, 2]]) == 1  # every row keeps one token of its own
    assert prefix_clusters([a, [1] + a], min_shared=16) == ([], [0, 1])


def test_length_buckets_bound_padding():
    lengths = [100, 8, 105, 300, 10, 109, 111]
    assert length_buckets(range(7), lengths) == [[1], [4], [0, 2, 5], [6], [3]]


def test_prefix_cache_path_equals_no_cache_path(models, tok):
    """Rows with a long shared prefix, wanted positions inside the prefix, at its edge and after
    it, suffixes of different lengths (several buckets: the cache copied), a row wanting
    nothing: clusters and plain forwards agree with one full forward per row."""
    model = models.student
    head = tok(" ".join(QUESTIONS))["input_ids"]
    tails = [tok(" 1 2 3" * k)["input_ids"] for k in (1, 2, 6, 7, 14)]
    rows = [head + t for t in tails] + [tok(QUESTIONS[1])["input_ids"]]
    shared = len(head)
    wanted = [
        [1, 2, shared - 1, shared, shared + 1],
        list(range(shared, len(rows[1]))),
        [5, len(rows[2]) - 1],
        [],
        list(range(1, len(rows[4]))),
        list(range(1, len(rows[5]))),
    ]
    args = {"temperature": 0.7, "chunk": 5}
    cached = gather_logprobs(model, rows, wanted, 0, share_prefix=True, **args)
    plain = gather_logprobs(model, rows, wanted, 0, share_prefix=False, **args)
    want = []
    with torch.no_grad():
        for r, w in zip(rows, wanted, strict=True):
            ids = torch.tensor([r])
            lp = plain_logprobs(model(input_ids=ids).logits[0, :-1], ids[0, 1:], 0.7)
            want += [float(lp[p - 1]) for p in w]
    assert cached.shape == plain.shape == (len(want),)
    torch.testing.assert_close(cached.double(), torch.tensor(want).double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0)
    clusters, _ = prefix_clusters([r[: max(w)] for r, w in zip(rows, wanted, strict=True) if w])
    assert [len(idx) for idx, _ in clusters] == [4]  # the prefix path really ran


def group(question: str, k: int) -> list[Sample]:
    """A GRPO group: one question, explanations of many lengths, one empty, one never closed."""
    solution = "17 + 25 = 42" if k % 2 == 0 else "5 - 3 - 6 = -4"
    texts = ["First add. " * n for n in (1, 3, 8)] + ["", "Then subtract and"]
    return [
        Sample(question, solution, t, closed=i != 4, id=f"q{k}-{i}") for i, t in enumerate(texts)
    ]


@pytest.mark.parametrize("batch", ["one-question", "mixed-questions"])
def test_batched_rewards_equal_per_sample(models, batch, monkeypatch):
    samples = group(QUESTIONS[0], 0)
    if batch == "mixed-questions":  # two groups interleaved, and a question alone
        samples = [s for pair in zip(samples, group(QUESTIONS[1], 1), strict=True) for s in pair]
        samples.append(Sample(QUESTIONS[2], "17", "Add nine and eight.", id="alone"))
    real, found = logprobs.prefix_clusters, []

    def spy(rows):
        found.append(real(rows))
        return found[-1]

    monkeypatch.setattr(logprobs, "prefix_clusters", spy)
    cfg = RewardConfig(logit_chunk=6)
    batched, single = reward_batch(models, samples, cfg), reward_per_sample(models, samples, cfg)
    assert not any(r.skipped for r in batched)
    for b, s in zip(batched, single, strict=True):
        for name in ("rlt_reward", "r_ss", "r_kl"):
            assert getattr(b, name) == pytest.approx(getattr(s, name), abs=1e-5, nan_ok=True)
        assert (b.explanation_tokens, b.solution_tokens, b.closed) == (
            s.explanation_tokens,
            s.solution_tokens,
            s.closed,
        )
    empty = next(r for r, s in zip(batched, samples, strict=True) if not s.explanation)
    assert empty.explanation_tokens == 0 and empty.r_kl == 0.0
    assert not batched[4 if batch == "one-question" else 8].closed
    # teacher and student side: each question's rows form one cluster over its shared prompt
    groups = 1 if batch == "one-question" else 2
    assert [len(clusters) for clusters, _ in found] == [groups, groups]
