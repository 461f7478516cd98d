"""The default backend: Hugging Face `generate`, batched, on CPU or GPU.

Prompts are sorted by token length so a batch wastes little padding, and padded on the left so every
row's new tokens start at the same column; the KV cache is on. Sampling is done per row by a logits
processor with the row's own `torch.Generator`, so a request's sample depends on its seed alone,
not on which other requests share its batch (HF's own sampling draws for the whole batch at once).
The model's `generation_config` defaults (e.g. Qwen's repetition penalty and top-k) are not
applied: the sample is exactly what `Sampling` says.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from potstill.teacher.backends import Backend, Generation, Request, Sampling


def render_prompt(tokenizer, request: Request) -> str:
    """The request's messages through the model's chat template, ready for the assistant turn."""
    messages = list(request.messages)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model: plain text, with the BOS a chat template would have added
        system = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
        user = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
        text = f"{tokenizer.bos_token or ''}{system}Question: {user}\nAnswer:"
    return text + request.prefill


class PerRowSampler(LogitsProcessor):
    """Temperature + top-p sampling with one generator per row; returns logits whose argmax is the
    sampled token, so `generate` runs in greedy mode and every row keeps its own random stream."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        chosen = torch.stack(
            [
                torch.multinomial(probs[row].cpu(), 1, generator=gen)
                for row, gen in enumerate(self.generators)
            ]
        ).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen, 0.0)


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 8, model_id: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.model_id = model_id or getattr(model.config, "_name_or_path", "") or "model"
        self.eos_ids = _eos_ids(model, tokenizer)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def prompt_tokens(self, request: Request) -> int:
        return len(self._encode(render_prompt(self.tokenizer, request)))

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model_id}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def generate(
        self, requests: Sequence[Request], sampling: Sampling
    ) -> Iterator[tuple[Request, Generation]]:
        prompts = [render_prompt(self.tokenizer, r) for r in requests]
        lengths = [len(self._encode(p)) for p in prompts]
        order = sorted(range(len(requests)), key=lambda i: (lengths[i], i))
        self.tokenizer.padding_side = "left"
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = [requests[i] for i in idx]
            texts = self._generate_batch([prompts[i] for i in idx], batch, sampling)
            yield from zip(batch, texts, strict=True)

    def _generate_batch(
        self, prompts: list[str], requests: list[Request], sampling: Sampling
    ) -> list[Generation]:
        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.model.device)
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=list(sampling.stop) or None,
        )
        processors = LogitsProcessorList()
        if sampling.temperature > 0:
            generators = [torch.Generator().manual_seed(r.seed) for r in requests]
            processors.append(PerRowSampler(generators, sampling.temperature, sampling.top_p))
        out = self.model.generate(
            **inputs,
            generation_config=config,
            logits_processor=processors,
            tokenizer=self.tokenizer if sampling.stop else None,
        )
        new_tokens = out[:, inputs["input_ids"].shape[1] :].tolist()
        return [
            self._finish(tokens, int(mask.sum()), sampling)
            for tokens, mask in zip(new_tokens, inputs["attention_mask"], strict=True)
        ]

    def _finish(self, tokens: list[int], prompt_tokens: int, sampling: Sampling) -> Generation:
        ended = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if ended is None else tokens[:ended]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        stop_at = [text.find(s) for s in sampling.stop if s in text]
        if stop_at:
            text = text[: min(stop_at)]
        finished = ended is not None or bool(stop_at)
        return Generation(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(kept),
            finish_reason="stop" if finished else "length",
        )


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
