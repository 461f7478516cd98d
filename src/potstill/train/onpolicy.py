"""On-policy distillation (GKD; Agarwal et al. 2024, "On-Policy Distillation of Language Models").

With probability λ a micro-batch's targets are replaced by the student's own samples of the same
prompts, which the online teacher then scores: the student learns from the teacher on the
sequences it actually produces, not only on the teacher's. Whether a micro-batch is sampled, and
each sample's seed, are pure functions of (seed, micro-batch index, row), so a resumed run draws
the same samples as an uninterrupted one (the weights they are drawn with are restored exactly).
Samples come from our hf backend's decode loop (per-row generators, no global RNG touched).
"""

from __future__ import annotations

import dataclasses

import torch

from potstill.data.examples import Example, build_example
from potstill.data.seeds import ROLLOUT_MIX, rollout_seed
from potstill.teacher.backends import Request, Sampling
from potstill.teacher.hf_backend import HFBackend


def uses_student_sample(seed: int, micro_batch: int, lmbda: float) -> bool:
    """Whether micro-batch `micro_batch` is on-policy: a seeded coin with P(heads) = λ."""
    if lmbda <= 0.0:
        return False
    gen = torch.Generator().manual_seed((seed * ROLLOUT_MIX + micro_batch) % (1 << 63))
    return bool(torch.rand((), generator=gen) < lmbda)


def student_samples(
    model, tokenizer, prompts: list[tuple[dict, ...]], *, seeds: list[int], sampling: Sampling,
    max_len: int,
) -> list[Example]:  # fmt: skip
    """The student's sample of each prompt, as an example whose target is that sample.

    Sampled in eval mode (no dropout) and inference mode; the model's train/eval mode is restored.
    A sample cut by `max_new_tokens` gets no end-of-turn token (the student did not stop there).
    """
    was_training = model.training
    model.eval()
    try:
        backend = HFBackend(model, tokenizer, batch_size=len(prompts))
        requests = [
            Request(key=str(i), messages=messages, seed=seed)
            for i, (messages, seed) in enumerate(zip(prompts, seeds, strict=True))
        ]
        outputs = {r.key: g for r, g in backend.generate(requests, sampling)}
    finally:
        model.train(was_training)
    examples = []
    for request in requests:
        generation = outputs[request.key]
        stopped = generation.finish_reason != "length"
        example = build_example(
            tokenizer, request.messages, generation.text, max_len, end_turn=stopped
        )
        if example is None and not stopped:  # nothing sampled and no stop: score the end-of-turn
            example = build_example(tokenizer, request.messages, generation.text, max_len)
        if example is None:  # the prompt alone fills max_len; keep one target token to score
            raise ValueError("prompt longer than max_seq_len reached on-policy sampling")
        examples.append(example)
    return examples


def on_policy_rollout(items: list, model, tokenizer, *, seed: int, micro_batch: int, cfg, max_len):
    """`items` (each with `.example` and `.messages`) with their targets replaced by student
    samples when this micro-batch's coin says so; else unchanged. `cfg` is an OnPolicyConfig."""
    if not uses_student_sample(seed, micro_batch, cfg.lmbda):
        return items
    sampling = Sampling(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p
    )
    examples = student_samples(
        model,
        tokenizer,
        [item.messages for item in items],
        seeds=[rollout_seed(seed, micro_batch, row) for row in range(len(items))],
        sampling=sampling,
        max_len=max_len,
    )
    return [
        dataclasses.replace(item, example=ex, sampled=True)
        for item, ex in zip(items, examples, strict=True)
    ]
