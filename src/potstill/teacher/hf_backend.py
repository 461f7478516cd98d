"""The default backend: a transformers model, continuously batched, on CPU or GPU.

The decoding loop is our own, on the model's KV cache (`hf_rows`): up to `batch_size` requests
decode together, shortest prompts first; a row leaves the batch the step it finishes and the next
prompt takes its slot, so the batch stays full and no row waits for the longest (HF `generate`
runs a batch until its longest row ends). Rows are left-padded to a common length. Each
row samples with its own `torch.Generator`, so a request's sample depends on its seed alone, not
on which other requests share its batch. The model's `generation_config` defaults (e.g. Qwen's
repetition penalty and top-k) are not applied: the sample is exactly what `Sampling` says.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch

from potstill.data.chat import render_chat, stop_token_id
from potstill.teacher import hf_rows
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


def length_order(lengths: Sequence[int]) -> list[int]:
    """Request indices by prompt length, ties in request order: the order requests start in."""
    return sorted(range(len(lengths)), key=lambda i: (lengths[i], i))


def batch_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Static batches (request indices) in `length_order`: what `HFBackend.generate` runs without
    continuous batching, and what the Ray engine hands its actors (a request's sample depends on
    its seed alone, so the local engine's samples are the same)."""
    order = length_order(lengths)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class HFBackend(Backend):
    name = "hf"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 8,
        model_id: str | None = None,
        continuous: bool = True,
    ):
        """`continuous=False`: static batches (the next batch starts when the last row of this
        one ends), what a sliding-window model always gets; kept for comparison."""
        self.model = model
        self.continuous = continuous
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
        """Continuous batching: up to `batch_size` requests decode together, shortest prompts
        first; a finished row leaves at once and the next prompt takes its slot (`hf_rows`).
        Models with sliding-window layers run the same order in static batches."""
        prompts = [render_prompt(self.tokenizer, r) for r in requests]
        ids = [self._encode(p) for p in prompts]
        queue = deque(length_order([len(x) for x in ids]))
        if sampling.max_new_tokens <= 0:
            queue.clear()
            for i, request in enumerate(requests):
                yield request, Generation("", len(ids[i]), 0, "length", token_ids=[])
        decode = _Decode(requests, sampling)
        refill = self.continuous and hf_rows.joinable(self.model)
        rows = None
        while queue or rows is not None:
            # fill every free slot (a newcomer can finish on its first token: fill again)
            while queue and (free := self.batch_size - len(rows or ())) and (refill or not rows):
                take = [queue.popleft() for _ in range(min(free, len(queue)))]
                newcomers, done = self._sample(self._prefill([ids[i] for i in take], take), decode)
                yield from ((requests[i], self._finish(decode, i, len(ids[i]))) for i in done)
                if newcomers is not None:
                    rows = newcomers if rows is None else hf_rows.join(rows, newcomers)
            if rows is None:
                continue
            last = [decode.tokens[i][-1] for i in rows.requests]
            rows, done = self._sample(hf_rows.step(self.model, rows, last), decode)
            yield from ((requests[i], self._finish(decode, i, len(ids[i]))) for i in done)

    def _sample(self, rows: hf_rows.Rows, decode: _Decode) -> tuple[hf_rows.Rows | None, list]:
        """Each row's next token; the rows still decoding, and the requests that finished."""
        sampling = decode.sampling
        chosen = sample_rows(
            rows.logits,
            [decode.generators[i] for i in rows.requests],
            sampling.temperature,
            sampling.top_p,
        ).tolist()
        kept, done = [], []
        for b, (i, token) in enumerate(zip(rows.requests, chosen, strict=True)):
            (kept if decode.add(i, token, self) else done).append(b)
        finished = [rows.requests[b] for b in done]
        if not kept:
            return None, finished
        return (rows if not done else hf_rows.keep(rows, kept)), finished

    def _prefill(self, prompts: list[list[int]], requests: list[int]) -> hf_rows.Rows:
        """The prompts left-padded to the longest, prefilled together."""
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        device = self.model.device
        return hf_rows.prefill(self.model, input_ids.to(device), mask.to(device), requests)

    def _hit_stop(self, tail: list[int], stops: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(s in text for s in stops)

    def _finish(self, decode: _Decode, i: int, prompt_tokens: int) -> Generation:
        tokens, sampling = decode.tokens[i], decode.sampling
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        stop_at = [text.find(s) for s in sampling.stop if s in text]
        if stop_at:
            text = text[: min(stop_at)]
        return Generation(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(tokens),
            finish_reason=decode.finish[i],
            token_ids=list(tokens),
        )


class _Decode:
    """Per request: its generator, its sampled tokens, and how it ended."""

    def __init__(self, requests: Sequence[Request], sampling: Sampling):
        self.sampling = sampling
        self.generators = [torch.Generator().manual_seed(r.seed) for r in requests]
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.finish = ["length"] * len(requests)
        self.window = max((len(s) for s in sampling.stop), default=0) + 4

    def add(self, i: int, token: int, backend: HFBackend) -> bool:
        """Record request i's sampled token; whether it goes on decoding."""
        if token in backend.eos_ids:
            self.finish[i] = "stop"
            return False
        self.tokens[i].append(token)
        stops = self.sampling.stop
        if stops and backend._hit_stop(self.tokens[i][-self.window :], stops):
            self.finish[i] = "stop"
            return False
        return len(self.tokens[i]) < self.sampling.max_new_tokens


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
