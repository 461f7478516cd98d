"""Continuous batching in the hf backend (teacher/hf_rows.py) on the tiny models of conftest:
every request's completion equals the one it gets alone, greedy and sampled, while rows leave
and newcomers join a running batch; the batch stays full; a sliding-window model runs static
batches with the same completions."""

from __future__ import annotations

import pytest
import torch

from potstill.models import load_model, load_tokenizer
from potstill.teacher import hf_rows
from potstill.teacher.backends import Request, Sampling
from potstill.teacher.hf_backend import HFBackend

QUESTIONS = [
    "What is 2?", "Calculate 5 - 3 - 6 please now.", "Add 7 and 8.", "What is 12 times 3?",
    "Count to four.", "Is 9 bigger than 4?", "What is 100 minus 1?", "Name a number.",
    "What is 6 + 6 + 6?", "Halve 40.", "Double 13 please.",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu").eval(), load_tokenizer(tiny_model_dir)


def requests() -> list[Request]:
    return [
        Request(key=f"q{i}", messages=({"role": "user", "content": q},), seed=100 + i)
        for i, q in enumerate(QUESTIONS)
    ]


def run(backend: HFBackend, sampling: Sampling, batch: list[Request] | None = None) -> dict:
    return {
        r.key: (g.token_ids, g.text, g.finish_reason, g.completion_tokens, g.prompt_tokens)
        for r, g in backend.generate(batch or requests(), sampling)
    }


def alone(model, tokenizer, sampling: Sampling) -> dict[str, tuple]:
    backend = HFBackend(model, tokenizer, batch_size=1)
    return {k: v for r in requests() for k, v in run(backend, sampling, [r]).items()}


@pytest.mark.parametrize(
    "sampling",
    [Sampling(max_new_tokens=12), Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9)],
    ids=["greedy", "sampled"],
)
def test_every_completion_is_the_one_the_request_gets_alone(tiny, sampling):
    model, tokenizer = tiny
    expected = alone(model, tokenizer, sampling)
    for batch_size in (3, 4, 16):
        assert run(HFBackend(model, tokenizer, batch_size=batch_size), sampling) == expected


def test_a_finished_row_is_replaced_at_once_so_the_batch_stays_full(tiny, monkeypatch):
    """Sampled completions of different lengths (a stop string ends them): every decoding step
    runs min(batch_size, requests not finished yet) rows (a static batch would run short as its
    rows end), and each result comes back the step its row finishes."""
    model, tokenizer = tiny
    sizes, step = [], hf_rows.step

    def counting_step(model, rows, tokens):
        sizes.append(len(rows))
        return step(model, rows, tokens)

    monkeypatch.setattr(hf_rows, "step", counting_step)
    sampling = Sampling(max_new_tokens=10, temperature=1.0, stop=("e",))  # ends rows early
    finished_after, lengths = [], set()
    for _, out in HFBackend(model, tokenizer, batch_size=4).generate(requests(), sampling):
        finished_after.append(len(sizes))
        lengths.add(out.completion_tokens)
    assert len(finished_after) == len(QUESTIONS) and len(lengths) > 2  # lengths do vary
    expected = [
        min(4, len(QUESTIONS) - sum(1 for done in finished_after if done <= j))
        for j in range(len(sizes))
    ]
    assert sizes == expected and sizes.count(4) < len(sizes)


def test_join_then_keep_reproduces_each_rows_own_logits(tiny):
    """Two prefilled groups of different prompt lengths joined, one row dropped: the next-step
    logits of every remaining row equal those it gets in a batch of its own."""
    model, tokenizer = tiny
    prompts = [tokenizer(q)["input_ids"] for q in QUESTIONS[:3]]

    def group(ids: list[list[int]], requests: list[int]) -> hf_rows.Rows:
        width = max(map(len, ids))
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        return hf_rows.prefill(model, input_ids, mask, requests)

    with torch.inference_mode():
        both = hf_rows.join(group(prompts[:1], [0]), group(prompts[1:], [1, 2]))
        assert both.requests == [0, 1, 2] and both.mask.shape == (3, max(map(len, prompts)))
        rows = hf_rows.step(model, hf_rows.keep(both, [0, 2]), [5, 6])
        for b, (i, token) in enumerate(zip(rows.requests, [5, 6], strict=True)):
            own = hf_rows.step(model, group([prompts[i]], [i]), [token])
            assert torch.allclose(rows.logits[b], own.logits[0], atol=1e-5)
        assert rows.mask.shape[1] == max(len(prompts[0]), len(prompts[2])) + 1  # cut columns


def test_a_sliding_window_model_runs_static_batches_with_the_same_completions(tiny_model_dir):
    from transformers import AutoConfig, Qwen2ForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.use_sliding_window, config.sliding_window = True, 4
    config.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    assert not hf_rows.joinable(model) and hf_rows.joinable(load_model(tiny_model_dir))
    sampling = Sampling(max_new_tokens=6)
    assert run(HFBackend(model, tokenizer, batch_size=4), sampling) == alone(
        model, tokenizer, sampling
    )


def test_max_new_tokens_zero_gives_empty_completions(tiny):
    model, tokenizer = tiny
    out = run(HFBackend(model, tokenizer, batch_size=4), Sampling(max_new_tokens=0))
    assert len(out) == len(QUESTIONS)
    assert {(tuple(ids), text, finish, n) for ids, text, finish, n, _ in out.values()} == {
        ((), "", "length", 0)
    }
