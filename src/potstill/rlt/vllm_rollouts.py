"""GRPO rollouts on a vLLM engine (`grpo.backend: vllm`), its weights kept equal to the policy's.

The engine lives in the training process beside the policy (colocated, as TRL's `vllm_mode:
colocate`): it takes `grpo.vllm.gpu_memory_utilization` of the GPU, the rest is the trainer's.
Before a rollout whose policy has changed since the last one (an optimizer step, a resume), the
policy's weights are pushed into the engine — for LoRA the adapters merged into their base
weights for the push and unmerged after, so the engine samples from exactly the weights the
loss differentiates — and the engine's prefix cache, which holds KV of the old weights, is
dropped. The reward and the loss still run on the policy itself (see `rlt.grpo`).

vLLM runs its engine core in a separate process by default; that process's model cannot take
weights from ours, so the engine is built with `VLLM_ENABLE_V1_MULTIPROCESSING=0` (in process).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from potstill.errors import ModelError

LORA_MARKERS = ("lora_", "original_module")


def engine_model_path(spec: str) -> str:
    """The full model the engine starts from: `spec` itself, or for a LoRA adapter directory
    (a warm-up's final/) its base; the adapter reaches the engine merged, at the first sync."""
    from potstill.models import resolve_model_path

    path = resolve_model_path(spec)
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{adapter} names no base model; set base_model_name_or_path")
        return resolve_model_path(base)
    return path


def _engine_name(name: str) -> str | None:
    """A policy parameter's name as the base model names it, or None for a LoRA-only tensor."""
    if any(marker in name for marker in LORA_MARKERS):
        return None
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight of `model` under the base model's names. A PEFT model's
    adapters are merged while the caller reads and unmerged when the iteration ends (or is
    abandoned), so the policy trains on unmerged adapters as before. The tensors are the
    policy's own (no copy of a 7B model): read each when it comes, as vLLM's loaders do."""
    merge = getattr(model, "merge_adapter", None)
    if merge is not None:
        merge()
    try:
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                engine_name = _engine_name(name)
                if engine_name is not None:
                    yield engine_name, tensor.detach()
    finally:
        if merge is not None:
            model.unmerge_adapter()


def _in_process_model(llm):
    """The engine's torch model, reachable only when its core runs in this process."""
    executor = getattr(llm.llm_engine, "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    for path in (("worker", "model_runner", "model"), ("model_runner", "model")):
        obj = worker
        for attr in path:
            obj = getattr(obj, attr, None)
        if obj is not None and hasattr(obj, "load_weights"):
            return obj
    raise ModelError(
        "grpo.backend: vllm cannot reach the engine's model to push the policy's weights "
        "(this vLLM build runs it in another process); set grpo.backend: hf"
    )


class VLLMRollouts:
    """A colocated vLLM engine for GRPO's sampling, synced to the policy on demand."""

    def __init__(self, model_spec: str, options, *, dtype: str, seed: int):
        from potstill.teacher.vllm_backend import VLLMBackend

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.backend = VLLMBackend(
            engine_model_path(model_spec),
            dtype=dtype,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=options.max_model_len,
            seed=seed,
            model_id=model_spec,
            enable_prefix_caching=True,
        )
        self.version: int | None = None  # the policy version the engine holds; None: the file's

    def sync(self, policy, version: int) -> None:
        """Push the policy's weights unless the engine already holds `version`."""
        if self.version == version:
            return
        llm = self.backend.llm
        _in_process_model(llm).load_weights(policy_weights(policy))
        llm.reset_prefix_cache()  # its KV was computed with the old weights
        self.version = version

    def generate(self, requests: Sequence, sampling) -> dict:
        return {r.key: gen for r, gen in self.backend.generate(requests, sampling)}

    def close(self) -> None:
        self.backend.close()
