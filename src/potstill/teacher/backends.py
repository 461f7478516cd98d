"""The generation interface every backend implements: `hf` (default), `vllm`, `openai`.

A stage hands a backend a list of `Request`s and gets `(request, Generation)` pairs back as they
finish, in any order, so it can write them to shards as it goes (a killed job keeps what it wrote).
Each request carries its own seed: the same request gives the same sample whatever else is in the
batch, which is what makes a resumed job equal an uninterrupted one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    """Stop strings; the completion ends before the first one (it is not included)."""


@dataclass(frozen=True)
class Request:
    key: str
    """Unique within a job (the output record's id)."""
    messages: tuple[dict, ...]
    """Chat messages: optional system, then user (role/content dicts)."""
    seed: int = 0
    prefill: str = ""
    """Text the assistant turn starts with (RLT pre-fills the solution); not part of the output."""


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop" (end of sequence or a stop string) or "length" (max_new_tokens reached)."""
    extra: dict = field(default_factory=dict)
    """Backend-specific details worth keeping (e.g. the served model name)."""
    token_ids: list[int] | None = None
    """The sampled tokens, stop string included (local backends; RL needs the exact tokens
    drawn, not a re-tokenisation of the text). None where the backend cannot tell."""


class Backend(ABC):
    """One model behind one generation engine."""

    name: str = "backend"

    @abstractmethod
    def generate(
        self, requests: Sequence[Request], sampling: Sampling
    ) -> Iterator[tuple[Request, Generation]]:
        """Yield every request with its generation, as each finishes (any order)."""

    def prompt_tokens(self, request: Request) -> int | None:
        """Length of the rendered prompt in tokens, or None when the backend cannot tell."""
        return None

    def prompt_tokens_many(self, requests: Sequence[Request]) -> list[int | None]:
        """`prompt_tokens` of each request (a remote backend measures them in one call)."""
        return [self.prompt_tokens(r) for r in requests]

    @property
    def context_length(self) -> int | None:
        """Longest prompt + completion the model takes, or None when unknown."""
        return None

    def describe(self) -> dict:
        """Provenance for the output records: backend and model."""
        return {"backend": self.name}

    def param_count(self) -> int | None:
        """The model's parameters, or None when it is not in reach (a server, vLLM's engine)."""
        model = getattr(self, "model", None)
        return sum(p.numel() for p in model.parameters()) if model is not None else None

    def close(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Release the model/engine/connections."""

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def complete(
    backend: Backend,
    questions: Sequence[str],
    sampling: Sampling | None = None,
    *,
    system_prompt: str | None = None,
    seed: int = 0,
) -> list[Generation]:
    """Answer each question once, in order: the shortest way to call any backend.

    >>> complete(HFBackend(model, tokenizer), ["What is 17+25?"], Sampling(max_new_tokens=32))
    """
    system = ({"role": "system", "content": system_prompt},) if system_prompt else ()
    requests = [
        Request(key=str(i), messages=(*system, {"role": "user", "content": q}), seed=seed + i)
        for i, q in enumerate(questions)
    ]
    results = {req.key: out for req, out in backend.generate(requests, sampling or Sampling())}
    return [results[r.key] for r in requests]
