"""Batched generation with Hugging Face `generate` (the default backend).

Prompts are sorted by length so each batch wastes little padding; padding is on the left so every
row's new tokens start at the same column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop" (eos reached) or "length" (max_new_tokens reached)."""


def chat_prompt(tokenizer, question: str, system_prompt: str | None = None) -> str:
    """The question wrapped in the model's chat template, ready for the assistant's turn."""
    messages = [{"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # No chat template (a base model): plain text, with the BOS a chat template would have added.
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{tokenizer.bos_token or ''}{prefix}Question: {question}\nAnswer:"


@torch.inference_mode()
def hf_generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
) -> list[Generation]:
    """Generate one completion per prompt, in the prompts' order."""
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    eos_ids = _eos_ids(model, tokenizer)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        sampling = {"do_sample": False}
        if temperature > 0:
            torch.manual_seed(seed + start)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            **sampling,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            ended = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
            kept = tokens if ended is None else tokens[:ended]
            results[i] = Generation(
                text=tokenizer.decode(kept, skip_special_tokens=True),
                prompt_tokens=int(batch["attention_mask"][row].sum()),
                completion_tokens=len(kept),
                finish_reason="length" if ended is None else "stop",
            )
    return results


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
