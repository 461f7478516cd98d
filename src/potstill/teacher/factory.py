"""Build the configured generation backend (engines are imported only when chosen)."""

from __future__ import annotations

from potstill.config.sections import BackendConfig, ModelConfig
from potstill.teacher.backends import Backend


def make_backend(model: ModelConfig, backend: BackendConfig, *, batch_size: int = 8) -> Backend:
    if backend.kind == "openai":
        from potstill.teacher.openai_backend import OpenAIBackend

        endpoint = backend.openai
        return OpenAIBackend(
            base_url=endpoint.base_url,  # one URL or a list (requests spread by record id)
            model=endpoint.model or model.name,
            api_key_env=endpoint.api_key_env,
            concurrency=endpoint.concurrency,
            timeout=endpoint.timeout,
            max_retries=endpoint.max_retries,
            backoff=endpoint.backoff,
        )
    if backend.kind == "vllm":
        from potstill.models import resolve_model_path
        from potstill.teacher.vllm_backend import VLLMBackend

        options = backend.vllm
        return VLLMBackend(
            str(resolve_model_path(model.name)),
            dtype=model.dtype,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=options.max_model_len,
            trust_remote_code=model.trust_remote_code,
            model_id=model.name,
        )
    from potstill.models import load_configured
    from potstill.teacher.hf_backend import HFBackend

    hf_model, tokenizer = load_configured(model)
    return HFBackend(hf_model, tokenizer, batch_size=batch_size, model_id=model.name)
