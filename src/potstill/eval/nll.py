"""Held-out NLL: how likely a model finds the teacher's verified answers to questions it never
trained on — the measure Hinton et al. (2015) compare soft and hard targets by, beside accuracy.

Each answer is scored the way the trainers build it (`data.examples.record_examples`: the
system prompt and question through the model's chat template, then the answer and the
end-of-turn token); an answer's NLL is the mean of −log p over its tokens, and the figure is the
mean over answers, with its standard error across answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from potstill.losses.reduce import IGNORE_INDEX


@dataclass
class AnswerData:
    """What `record_examples` reads: the question, the teacher's answer, the training prompt."""

    system_prompt: str | None
    prompt_field: str = "question"
    target_field: str = "completion"


def answer_nlls(model, tokenizer, records: list[dict], system_prompt: str | None, *,
                max_len: int = 1024, batch_size: int = 8) -> list[float]:  # fmt: skip
    """Mean per-token NLL of each record's `completion` under `model`, in record order (an
    answer with no token within `max_len` is left out)."""
    from potstill.data.examples import collate, record_examples

    data = AnswerData(system_prompt)
    examples = [e for _, _, e in record_examples(records, data, tokenizer, max_len, where="nll")]
    examples = [e for e in examples if e is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = {
                k: v.to(device)
                for k, v in collate(examples[start : start + batch_size], pad).items()
            }
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
            ).logits[:, :-1].float()  # fmt: skip
            labels = batch["labels"][:, 1:]
            out += _mean_nll(logits, labels).tolist()
    return out


def _mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean of −log p(label) over positions that carry a label.

    logits: (B, T, V); labels: (B, T) with IGNORE_INDEX where nothing is scored. Returns (B,)."""
    mask = labels != IGNORE_INDEX
    picked = torch.gather(logits, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = (torch.logsumexp(logits, dim=-1) - picked) * mask
    return nll.sum(-1) / mask.sum(-1).clamp(min=1)


def summarise(nlls: list[float]) -> dict:
    """{nll, stderr, answers}: the mean over answers and its standard error."""
    n = len(nlls)
    if n == 0:
        return {"nll": None, "stderr": None, "answers": 0}
    mean = sum(nlls) / n
    var = sum((x - mean) ** 2 for x in nlls) / (n - 1) if n > 1 else math.nan
    return {"nll": mean, "stderr": math.sqrt(var / n) if n > 1 else None, "answers": n}
