"""The `vllm` backend: vLLM's offline engine, for fast teacher generation on GPUs.

Prompts are rendered exactly as the `hf` backend renders them (same chat template, same prefill)
and handed to vLLM as token ids, so both backends see the same prompt and vLLM adds no second BOS.
Each request gets its own `SamplingParams` with its own seed: vLLM then samples it from a private
generator, so its result does not depend on which other requests share a batch (up to the float
noise of batched kernels on GPU). As with `hf`, the model's `generation_config` sampling defaults
(e.g. a repetition penalty) are not applied: vLLM only uses them when no `SamplingParams` is given.
Requests go to the engine's own queue and come back as each finishes, so a stage writes finished
samples while the rest still run, and the engine keeps its batch full throughout.

vLLM is imported only when the backend is built: it is an optional dependency (a GPU build).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from potstill.data.chat import stop_token_id
from potstill.errors import DataError, ModelError, import_optional
from potstill.teacher.backends import Backend, Generation, Request, Sampling
from potstill.teacher.hf_backend import render_prompt

MISSING_VLLM = (
    "the vllm backend needs vLLM: `pip install 'potstill[vllm]'` on a GPU machine, "
    "or set `backend.kind: hf`"
)


def import_vllm():
    """The `vllm` module, or a one-line `ModelError` when it is not installed."""
    return import_optional("vllm", ModelError, MISSING_VLLM)


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        model_id: str | None = None,
        **engine_kwargs: Any,
    ):
        """`model`: a local directory or hub name; `model_id`: the name recorded in `describe()`
        (default: `model`); `engine_kwargs` go to `vllm.LLM` as they are (e.g. `enforce_eager`)."""
        vllm = import_vllm()
        self._vllm = vllm
        self.model_id = model_id or model
        self.llm = vllm.LLM(
            model=model,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
            seed=seed,
            **engine_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        # The chat template's end-of-turn, which vLLM does not stop on by itself when the
        # model's generation config names only the eos (a base model fine-tuned to chat).
        stop = stop_token_id(self.tokenizer)
        self._stop_ids = [stop] if stop is not None else []

    @property
    def context_length(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    def prompt_tokens(self, request: Request) -> int:
        return len(self._encode(request))

    def describe(self) -> dict:
        return {"backend": self.name, "model": self.model_id, "vllm": self._vllm.__version__}

    def _encode(self, request: Request) -> list[int]:
        # The chat template already holds any BOS the model wants: add no special tokens.
        return self.tokenizer.encode(
            render_prompt(self.tokenizer, request), add_special_tokens=False
        )

    def _params(self, request: Request, sampling: Sampling):
        return self._vllm.SamplingParams(
            n=1,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=list(sampling.stop) or None,
            stop_token_ids=self._stop_ids or None,
            seed=request.seed,
        )

    def generate(
        self, requests: Sequence[Request], sampling: Sampling
    ) -> Iterator[tuple[Request, Generation]]:
        engine = self.llm.llm_engine
        limit = self.context_length
        # Check every prompt before queueing any: a too-long one fails the job now, not halfway.
        prompts = [self._encode(r) for r in requests]
        for request, ids in zip(requests, prompts, strict=True):
            if len(ids) >= limit:
                raise DataError(
                    f"request {request.key}: prompt is {len(ids)} tokens, the model takes "
                    f"{limit}; set generation.max_prompt_tokens or raise backend.vllm.max_model_len"
                )
        pending = set()
        try:
            for i, (request, ids) in enumerate(zip(requests, prompts, strict=True)):
                params = self._params(request, sampling)
                engine.add_request(str(i), {"prompt_token_ids": ids}, params)
                pending.add(str(i))
            while pending:
                for output in engine.step():
                    if output.finished:
                        pending.discard(output.request_id)
                        yield requests[int(output.request_id)], _generation(output)
        finally:  # the caller stopped early or a request failed: leave an empty queue behind
            if pending:
                engine.abort_request(list(pending))

    def close(self) -> None:
        """Stop the engine process now, so its GPU memory is free for what runs next."""
        if self.llm is None:
            return
        core = getattr(self.llm.llm_engine, "engine_core", None)  # V1 engines run in a process
        if hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None


def _generation(output) -> Generation:
    """A finished `RequestOutput` as a `Generation`."""
    completion = output.outputs[0]
    reason = str(completion.finish_reason)
    if reason not in ("stop", "length"):  # abort/error: no usable sample
        raise RuntimeError(f"vllm ended request {output.request_id} with {reason!r}")
    ids = list(completion.token_ids)
    if reason == "stop" and not isinstance(completion.stop_reason, str):
        ids = ids[:-1]  # vLLM keeps the EOS/stop token; `hf` does not count it, so neither do we
    return Generation(
        text=completion.text,
        prompt_tokens=len(output.prompt_token_ids),
        completion_tokens=len(ids),
        finish_reason=reason,
        token_ids=ids,
    )
