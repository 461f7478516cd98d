"""The default backend: Hugging Face `generate`, batched, on CPU or GPU.

Prompts are sorted by token length so a batch wastes little padding, and padded on the left so every
row's new tokens start at the same column. The decoding loop is our own, on the model's KV cache:
rows that finish leave the batch at once (HF `generate` keeps computing them until the longest row
ends; how much that saves depends on how much completion lengths vary and is not benchmarked). Each
row samples with its own `torch.Generator`, so a request's sample depends on its seed alone, not
on which other requests share its batch. The model's `generation_config` defaults (e.g. Qwen's
repetition penalty and top-k) are not applied: the sample is exactly what `Sampling` says.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from potstill.data.chat import render_chat, stop_token_id
from potstill.teacher.backends import Backend, Generation, Request, Sampling


def render_prompt(tokenizer, request: Request) -> str:
    """The request's messages through the model's chat template, ready for the assistant turn."""
    return render_chat(tokenizer, request.messages, request.prefill)


def sample_rows(
    logits: torch.Tensor, generators: list[torch.Generator], temperature: float, top_p: float
) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else temperature + top-p (nucleus) sampling
    with each row's own generator, so a row's draw never depends on the other rows."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    return torch.stack(
        [
            torch.multinomial(row.cpu(), 1, generator=gen)[0]
            for row, gen in zip(probs, generators, strict=True)
        ]
    ).to(logits.device)


def _nucleus(probs: torch.Tensor, top_p: float, candidates: int = 1024) -> torch.Tensor:
    """Zero all but the smallest set of top tokens whose mass reaches top_p (the first always
    stays). A top-k pre-selection avoids sorting the whole vocabulary; rows whose nucleus is
    wider than it (very flat distributions) fall back to a full sort, so the result is exact."""
    k = min(candidates, probs.shape[-1])
    top, idx = probs.topk(k, dim=-1)
    if (top.sum(-1) < top_p).any():
        top, idx = probs.sort(dim=-1, descending=True)
    outside = top.cumsum(-1) - top >= top_p
    return torch.zeros_like(probs).scatter_(-1, idx, top.masked_fill(outside, 0.0))


def batch_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The batches (request indices) `HFBackend.generate` runs: by prompt length, ties in request
    order. The Ray engine makes the same batches, so its samples are the local ones bit for bit."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


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
        self.tokenizer.padding_side = "left"
        for idx in batch_order(lengths, self.batch_size):
            batch = [requests[i] for i in idx]
            texts = self._generate_batch([prompts[i] for i in idx], batch, sampling)
            yield from zip(batch, texts, strict=True)

    def _generate_batch(
        self, prompts: list[str], requests: list[Request], sampling: Sampling
    ) -> list[Generation]:
        """Prefill the batch, then decode one token per step for the rows still running.
        Finished rows leave the batch (their KV cache rows are dropped), so a batch costs what its
        rows generate, not rows × its longest completion as with `generate`."""
        from transformers import DynamicCache

        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.model.device)
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(
            input_ids=inputs["input_ids"],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        generators = [torch.Generator().manual_seed(r.seed) for r in requests]
        rows = list(range(len(requests)))  # batch row -> request index, for the running rows
        tokens: list[list[int]] = [[] for _ in requests]
        finish = ["length"] * len(requests)
        next_pos = positions[:, -1] + 1
        window = max((len(s) for s in sampling.stop), default=0) + 4
        for _ in range(sampling.max_new_tokens):
            chosen = sample_rows(
                logits, [generators[i] for i in rows], sampling.temperature, sampling.top_p
            ).tolist()
            still = []
            for b, (i, token) in enumerate(zip(rows, chosen, strict=True)):
                if token in self.eos_ids:
                    finish[i] = "stop"
                    continue
                tokens[i].append(token)
                if sampling.stop and self._hit_stop(tokens[i][-window:], sampling.stop):
                    finish[i] = "stop"
                    continue
                still.append(b)
            if not still or len(tokens[rows[still[0]]]) >= sampling.max_new_tokens:
                break
            if len(still) < len(rows):
                keep = torch.tensor(still, device=mask.device)
                cache.batch_select_indices(keep)
                mask, next_pos = mask[keep], next_pos[keep]
                rows = [rows[b] for b in still]
            step_ids = torch.tensor([[tokens[i][-1]] for i in rows], device=mask.device)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
            logits = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            next_pos = next_pos + 1
        lengths = inputs["attention_mask"].sum(-1).tolist()
        return [
            self._finish(tokens[i], int(lengths[i]), finish[i], sampling)
            for i in range(len(requests))
        ]

    def _hit_stop(self, tail: list[int], stops: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(s in text for s in stops)

    def _finish(
        self, tokens: list[int], prompt_tokens: int, finish: str, sampling: Sampling
    ) -> Generation:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        stop_at = [text.find(s) for s in sampling.stop if s in text]
        if stop_at:
            text = text[: min(stop_at)]
        return Generation(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(tokens),
            finish_reason=finish,
            token_ids=list(tokens),
        )


def _eos_ids(model, tokenizer) -> list[int]:
    """What ends a sample: the model's own eos ids, the tokenizer's eos, and the chat template's
    end-of-turn token (the one every training target ends with, `data.chat.end_of_turn`), which
    a base model's generation config does not name: a Gemma base fine-tuned on `<end_of_turn>`
    targets must stop on it, not run on to `max_new_tokens`."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    for extra in (tokenizer.eos_token_id, stop_token_id(tokenizer)):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids
