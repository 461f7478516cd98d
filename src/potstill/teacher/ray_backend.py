"""`engine: ray` for generation: a `Backend` whose model runs in a pool of Ray actors.

    potstill generate --config configs/generate.yaml --set engine=ray --set ray.num_workers=4

The driver builds the requests (ids, per-sample seeds from the record id: `data.seeds`), asks a
worker for the prompt lengths, and cuts the batches exactly as `HFBackend.generate` would
(`batch_order`); each actor runs the configured backend (hf, vllm) over whole batches, and the
results come back in batch order, so the stage writes the same records as the local engine (in
the same shards where every row of a batch ends together: the local hf engine batches
continuously and writes rows as they finish). A batch that fails every retry is kept in
`failed`, not yielded: the stage lists it in `failed.jsonl` and a rerun generates it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from potstill.config.engine import RayConfig
from potstill.config.sections import BackendConfig, ModelConfig
from potstill.errors import ModelError
from potstill.teacher.backends import Backend, Generation, Request, Sampling
from potstill.teacher.hf_backend import batch_order
from potstill.teacher.ray_pool import Failed, Pool, PoolWorker

MEASURE_CHUNK = 512
"""Prompts measured per call to a worker."""


class GenerateWorker(PoolWorker):
    """One Ray actor: the configured backend, loaded once, run over whole batches."""

    def __init__(self, model: ModelConfig, backend: BackendConfig, batch_size: int):
        from potstill.teacher.factory import make_backend

        self.backend = make_backend(model, backend, batch_size=batch_size)

    def info(self) -> dict:
        backend = self.backend
        return {
            "name": backend.name,
            "describe": backend.describe(),
            "context_length": backend.context_length,
        }

    def param_count(self) -> int | None:
        return self.backend.param_count()

    def prompt_tokens(self, requests: list[Request]) -> list[int | None]:
        return self.backend.prompt_tokens_many(requests)

    def generate(self, requests: list[Request], sampling: Sampling) -> list[tuple]:
        return [(r.key, out) for r, out in self.backend.generate(requests, sampling)]


class RayBackend(Backend):
    """The configured backend on `ray.num_workers` actors; describes itself as that backend, so
    the samples' provenance is the local engine's. `close()` stops the actors (and the local
    cluster it started)."""

    def __init__(
        self, model: ModelConfig, backend: BackendConfig, ray: RayConfig, *, batch_size: int
    ):
        self.batch_size = batch_size
        self.failed: list[Failed] = []
        self._lengths: dict[str, int | None] = {}
        self.pool = Pool(ray, GenerateWorker, model, backend, batch_size)
        try:
            info = self.pool.call(0, "info")
        except BaseException:
            self.close()
            raise
        self.name = info["name"]
        self._describe = info["describe"]
        self._context = info["context_length"]

    @property
    def context_length(self) -> int | None:
        return self._context

    def describe(self) -> dict:
        return dict(self._describe)

    def param_count(self) -> int | None:
        """Counted by an actor, on the model it holds."""
        return self.pool.call(0, "param_count")

    def prompt_tokens(self, request: Request) -> int | None:
        return self.prompt_tokens_many([request])[0]

    def prompt_tokens_many(self, requests: Sequence[Request]) -> list[int | None]:
        missing = [r for r in requests if r.key not in self._lengths]
        chunks = [missing[i : i + MEASURE_CHUNK] for i in range(0, len(missing), MEASURE_CHUNK)]
        for index, lengths in self.pool.run("prompt_tokens", chunks):
            if isinstance(lengths, Failed):
                raise ModelError(f"engine: ray: measuring prompts failed: {lengths.error}")
            self._lengths.update(zip(_keys(chunks[index]), lengths, strict=True))
        return [self._lengths[r.key] for r in requests]

    def generate(
        self, requests: Sequence[Request], sampling: Sampling
    ) -> Iterator[tuple[Request, Generation]]:
        lengths = [n or 0 for n in self.prompt_tokens_many(requests)]
        batches = [[requests[i] for i in idx] for idx in batch_order(lengths, self.batch_size)]
        for index, result in self.pool.run("generate", batches, sampling):
            if isinstance(result, Failed):
                self.failed.append(result)
                continue
            by_key = {r.key: r for r in batches[index]}
            for key, out in result:
                yield by_key[key], out

    def close(self) -> None:
        self.pool.close()  # a second close() does nothing


def _keys(requests: list[Request]) -> list[str]:
    return [r.key for r in requests]
