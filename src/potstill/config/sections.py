"""Config sections shared by the stages, and the stage configs built from them.

Each field's help is the docstring under it; ranges are checked in `__post_init__`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from potstill.config import check, shown
from potstill.config.trackers import check_trackers
from potstill.redact import add_secret

MAX_SEED = 2**32
"""Seeds are in [0, 2**32): numpy's range, and the trainer seeds a torch generator with
seed * 1000 + epoch, which a seed near 2**63 overflows mid-run."""
SOURCE = "a .jsonl or .parquet file, a directory, rg:TASK?size=N, or a mixture A + B"


def check_seed(seed: int) -> None:
    check(0 <= seed < MAX_SEED, f"seed: must be in [0, 2**32), got {seed}")


def check_given(value: str | None, name: str, what: str) -> None:
    """`value` is null or holds something: an empty path would mean the current directory."""
    check(value is None or bool(value.strip()), f"{name}: empty; give {what}")


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or "all-linear"."""
    top_layers: int | None = None
    """Adapt only the top N decoder layers (default: all): the backward pass then stops below
    them, so a step computes less."""

    def __post_init__(self):
        check(self.r > 0, f"r: must be a positive integer, got {self.r}")
        check(self.alpha > 0, f"alpha: must be a positive integer, got {self.alpha}")
        check(
            self.top_layers is None or self.top_layers > 0,
            f"top_layers: must be > 0, got {self.top_layers}",
        )
        check(0.0 <= self.dropout < 1.0, f"dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig:
    name: str = "qwen2.5-coder-0.5b-instruct"
    """Offline kit name (`potstill models list`), local directory, .gguf file, or hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: auto = bf16 on a GPU that supports it, float32 on CPU."""
    device: str = "auto"
    """cpu, cuda, cuda:1, or auto."""
    trust_remote_code: bool = False
    """Run custom model code from the model's repository. Off unless you reviewed that code."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights (omit for full fine-tuning)."""

    def __post_init__(self):
        check(bool(self.name.strip()), "name: empty; give a kit name, a directory or a hub id")


@dataclass
class DataConfig:
    source: str = "rg:basic_arithmetic?size=8&seed=1&max_terms=3&max_digits=2"
    """Records: .jsonl, .parquet, a directory, or rg:TASK?size=N&seed=S (reasoning-gym)."""
    limit: int | None = None
    """Use only the first N records."""

    def __post_init__(self):
        check_given(self.source, "source", SOURCE)
        check(self.limit is None or self.limit > 0, f"limit: must be > 0, got {self.limit}")


MIN_TEMPERATURE = 1e-2
"""Below this (but above 0) softmax(logits / T) overflows to one-hot or NaN: use 0 (greedy)."""


@dataclass
class SamplingConfig:
    """How a model samples: every stage that samples (generate, eval, curate's rewrite, rlt
    explain, GRPO rollouts, on-policy distillation) extends this one section, so the fields
    mean the same everywhere and are checked in one place."""

    max_new_tokens: int = 64
    """Stop after this many new tokens."""
    temperature: float = 0.0
    """Softmax temperature; 0 = greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens holding this much probability
    (1 = all tokens)."""

    def __post_init__(self):
        check(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0,
            f"max_new_tokens: must be a positive integer, got {self.max_new_tokens}",
        )
        check(
            math.isfinite(self.temperature)
            and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE),
            f"temperature: must be 0 (greedy) or a finite value >= {MIN_TEMPERATURE}, "
            f"got {self.temperature}",
        )
        check(
            math.isfinite(self.top_p) and 0 < self.top_p <= 1,
            f"top_p: must be in (0, 1], got {self.top_p}",
        )


@dataclass
class GenerationConfig(SamplingConfig):
    num_samples: int = 1
    """Samples per record."""
    batch_size: int = 8
    """Prompts per generate call."""
    seed: int = 0
    """Base seed; each sample derives its own from it."""
    system_prompt: str | None = None
    """Bundled prompt name or path to a text file (prompts are kept out of YAML on purpose)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a completion ends before the first one."""
    max_prompt_tokens: int | None = None
    """Skip (and record) prompts longer than this; default: the model's context minus
    max_new_tokens."""

    def __post_init__(self):
        super().__post_init__()
        check(self.num_samples > 0, f"num_samples: must be > 0, got {self.num_samples}")
        check(self.batch_size > 0, f"batch_size: must be > 0, got {self.batch_size}")
        check_seed(self.seed)
        check(
            self.max_prompt_tokens is None or self.max_prompt_tokens > 0,
            f"max_prompt_tokens: must be > 0, got {self.max_prompt_tokens}",
        )
        # An empty stop string matches before any text: every completion would come back empty.
        check("" not in self.stop, "stop: an empty string ends every completion at once; drop it")


@dataclass
class OpenAIEndpointConfig:
    base_url: str | list[str] = "http://127.0.0.1:8000/v1"
    """The endpoint's base URL (a `vllm serve`, `potstill serve`, or an API provider), or a list
    of URLs serving the same model: each record then goes to the one its id hashes to (a rerun
    sends it to the same one)."""
    model: str | None = None
    """Model name the server knows; default: model.name."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (never the key itself); null = no auth."""
    concurrency: int = 8
    """Requests in flight at once, per endpoint."""
    timeout: float = 300.0
    """Seconds per request before it is retried."""
    max_retries: int = 6
    """Tries after the first on 429, 5xx, timeouts and connection errors (exponential backoff)."""
    backoff: float = 1.0
    """Base seconds of the exponential backoff between retries (a Retry-After header wins)."""

    def __post_init__(self):
        # The key is known from here on, so no message or file can show it.
        if isinstance(self.api_key_env, str):
            add_secret(os.environ.get(self.api_key_env))
        urls = [self.base_url] if isinstance(self.base_url, str) else self.base_url
        check(bool(urls), "base_url: empty list; give at least one endpoint URL")
        bad = next((u for u in urls if not u.startswith(("http://", "https://"))), None)
        check(bad is None, f"base_url: must start with http:// or https://, got {shown(bad)}")
        check(
            self.api_key_env is None or _looks_like_env_name(self.api_key_env),
            "api_key_env: must name an environment variable (letters, digits, _) that holds the "
            "key, never the key itself (not repeated here); export MY_KEY=... and set "
            "api_key_env: MY_KEY",
        )
        check(self.concurrency > 0, f"concurrency: must be > 0, got {self.concurrency}")
        check(self.timeout > 0, f"timeout: must be > 0, got {self.timeout}")
        check(self.max_retries >= 0, f"max_retries: must be >= 0, got {self.max_retries}")
        check(self.backoff >= 0, f"backoff: must be >= 0, got {self.backoff}")


def _looks_like_env_name(name: str) -> bool:
    """A variable name, and not a pasted key: keys are long mixes of cases and digits."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return False
    mixed = any(c.islower() for c in name) and any(c.isupper() for c in name)
    return not (len(name) >= 20 and mixed and any(c.isdigit() for c in name))


@dataclass
class VLLMConfig:
    tensor_parallel_size: int = 1
    """GPUs one model is split over."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may take."""
    max_model_len: int | None = None
    """Context length (default: the model's)."""

    def __post_init__(self):
        check(
            self.tensor_parallel_size > 0,
            f"tensor_parallel_size: must be > 0, got {self.tensor_parallel_size}",
        )
        check(
            0 < self.gpu_memory_utilization <= 1,
            f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        check(
            self.max_model_len is None or self.max_model_len > 0,
            f"max_model_len: must be > 0, got {self.max_model_len}",
        )


@dataclass
class BackendConfig:
    kind: Literal["hf", "vllm", "openai"] = "hf"
    """hf: transformers generate (CPU or GPU); vllm: vLLM engine (GPU); openai: an HTTP endpoint."""
    openai: OpenAIEndpointConfig = field(default_factory=OpenAIEndpointConfig)
    """Settings of the openai backend."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Settings of the vllm backend."""


@dataclass
class TrainConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warm-up."""
    warmup_ratio: float = 0.03
    """Fraction of steps spent warming up."""
    epochs: float = 1.0
    """Passes over the data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    micro_batch_size: int = 1
    """Sequences per forward pass."""
    grad_accum: int = 8
    """Micro-batches per optimizer step; the loss is normalised over all of them."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = off)."""
    max_seq_len: int = 2048
    """Truncate longer sequences."""
    save_every: int = 100
    """Checkpoint every N optimizer steps."""
    seed: int = 0
    """Seed for data order, dropout and sampling."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept (older ones are deleted)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 mixed precision on a GPU that has it, fp32 otherwise."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more time."""
    packing: bool = False
    """Pack several short examples into one sequence of max_seq_len (no attention across them)."""
    merge_lora: bool = False
    """Save the final model with LoRA merged into the weights (else the adapter alone)."""

    def __post_init__(self):
        check(
            self.keep_checkpoints > 0,
            f"keep_checkpoints: must be > 0, got {self.keep_checkpoints}",
        )
        for name in ("lr", "warmup_ratio", "epochs", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            check(math.isfinite(value), f"{name}: must be a finite number, got {value}")
        check(self.lr > 0, f"lr: must be > 0, got {self.lr}; a usual value is 1e-5")
        check(
            0 <= self.warmup_ratio < 1, f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}"
        )
        check(self.epochs > 0, f"epochs: must be > 0, got {self.epochs}")
        check(
            self.max_steps is None or self.max_steps > 0,
            f"max_steps: must be > 0, got {self.max_steps}",
        )
        check(
            self.micro_batch_size > 0, f"micro_batch_size: must be > 0, got {self.micro_batch_size}"
        )
        check(self.grad_accum > 0, f"grad_accum: must be > 0, got {self.grad_accum}")
        check(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        check(self.max_grad_norm >= 0, f"max_grad_norm: must be >= 0, got {self.max_grad_norm}")
        check(self.max_seq_len > 0, f"max_seq_len: must be > 0, got {self.max_seq_len}")
        check(self.save_every > 0, f"save_every: must be > 0, got {self.save_every}")
        check_seed(self.seed)


@dataclass
class RunConfig:
    output_dir: str = "runs/quickstart"
    """Run directory: resolved config, manifest, shards, logs, checkpoints."""
    log_with: list[Literal["tensorboard", "wandb", "mlflow"]] = field(
        default_factory=lambda: ["tensorboard"]
    )
    """Experiment trackers; W&B and MLflow need their extras installed."""

    def __post_init__(self):
        check_trackers(self.log_with)  # refused here, before any model loads
        # Caught here as well as in RunDir: a shard's run directory is `{output_dir}/shards/..`,
        # which with an empty output_dir is a relative path RunDir would take.
        check(
            bool(str(self.output_dir).strip()),
            "output_dir: empty, which would write into the current directory; name a "
            "directory for the run, e.g. runs/my-run",
        )


@dataclass
class SFTDataConfig:
    source: str = "runs/curate/kept.jsonl"
    """Curated records: .jsonl, .parquet, a shard directory, or a datasets directory."""
    limit: int | None = None
    """Use only the first N records."""
    prompt_field: str = "question"
    """Record field the prompt (user turn) is built from."""
    target_field: str = "completion"
    """Record field the model learns to write (the loss is on these tokens only)."""
    system_prompt: str | None = "step_by_step"
    """Bundled prompt name or text file; use the one the traces were generated with."""

    def __post_init__(self):
        check_given(self.source, "source", SOURCE)
        check(self.limit is None or self.limit > 0, f"limit: must be > 0, got {self.limit}")
