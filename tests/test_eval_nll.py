"""Held-out NLL (eval/nll.py): closed forms, and batched answers scored as one at a time."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.data.examples import build_example
from potstill.eval.nll import _mean_nll, answer_nlls, summarise
from potstill.losses.reduce import IGNORE_INDEX
from potstill.models import load_model, load_tokenizer
from potstill.prompts import load_prompt


def test_uniform_logits_give_log_v_and_unlabelled_positions_count_for_nothing():
    logits = torch.zeros(2, 5, 7)
    labels = torch.tensor([[3, 1, IGNORE_INDEX, IGNORE_INDEX, 2], [IGNORE_INDEX] * 4 + [6]])
    logits[0, 2] = 100.0  # an unlabelled position, however wrong, changes nothing
    assert _mean_nll(logits, labels).tolist() == pytest.approx([math.log(7), math.log(7)])
    logits[1, 4, 6] = math.log(13)  # p(6) = 13 / (13 + 6)
    assert _mean_nll(logits, labels)[1].item() == pytest.approx(-math.log(13 / 19))


def test_summarise_is_the_mean_over_answers_with_its_standard_error():
    assert summarise([1.0, 2.0, 4.0]) == pytest.approx(
        {"nll": 7 / 3, "stderr": math.sqrt((16 / 9 + 1 / 9 + 25 / 9) / 2 / 3), "answers": 3}
    )
    assert summarise([]) == {"nll": None, "stderr": None, "answers": 0}


def test_batched_answers_score_as_each_alone(tiny_model_dir):
    """Right padding must not change a row: each answer against its own unpadded forward."""
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu").eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    records = [
        {"id": f"q{i}", "question": f"What is {i} + {i}?", "completion": text}
        for i, text in enumerate(["It is two.", "four", "The sum is six, step by step: 3 + 3."])
    ]
    batched = answer_nlls(model, tokenizer, records, "arithmetic_steps", batch_size=3)
    system = load_prompt("arithmetic_steps")
    alone = []
    for r in records:
        messages = (
            {"role": "system", "content": system},
            {"role": "user", "content": r["question"]},
        )
        example = build_example(tokenizer, messages, r["completion"], 1024)
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        targets = [(i, t) for i, t in enumerate(example.labels[1:]) if t != IGNORE_INDEX]
        alone.append(-sum(logp[i, t].item() for i, t in targets) / len(targets))
    assert batched == pytest.approx(alone, abs=1e-4)
    assert len(set(batched)) == 3  # three answers, three values
