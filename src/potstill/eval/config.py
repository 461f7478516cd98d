"""Config sections of `potstill eval`: the models, the tasks and the price."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from potstill.config import check
from potstill.config.sections import SOURCE, ModelConfig, check_given
from potstill.eval.tasks import _task_name


@dataclass
class EvalModel:
    name: str = "qwen2.5-coder-0.5b-instruct"
    """Kit name, model directory (a fine-tuned student's `final/`, adapter or merged), or hub id."""
    label: str | None = None
    """Name in tables and plots (default: name). Unique within the eval."""
    role: Literal["teacher", "student"] = "student"
    """Teacher or student: the report contrasts them."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: auto = bf16 on a GPU that supports it, float32 on CPU."""
    device: str = "auto"
    """cpu, cuda, cuda:1, or auto."""
    trust_remote_code: bool = False
    """Run custom model code from the model's repository. Off unless you reviewed that code."""

    def __post_init__(self):
        check(bool(self.name.strip()), "name: empty; give a kit name, a directory or a hub id")
        self.label = self.label or self.name

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            name=self.name,
            dtype=self.dtype,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
        )


def eval_model(model, label: str, role: str, name: str | None = None) -> EvalModel:
    """An EvalModel for a stage's model section (`name` overrides the spec: a trained final/)."""
    return EvalModel(
        name=name or model.name, label=label, role=role, dtype=model.dtype, device=model.device,
        trust_remote_code=model.trust_remote_code,
    )  # fmt: skip


@dataclass
class EvalTask:
    source: str = "rg:basic_arithmetic?size=40&seed=1001&max_terms=3&max_digits=2"
    """Questions with answers: .jsonl, .parquet, a directory, or rg:TASK?size=N&seed=S."""
    name: str | None = None
    """Name in tables and plots (default: the reasoning-gym task or the file's stem)."""
    limit: int | None = None
    """Use only the first N questions."""

    def __post_init__(self):
        check_given(self.source, "source", SOURCE)
        check(self.limit is None or self.limit > 0, f"limit: must be > 0, got {self.limit}")
        self.name = self.name or _task_name(self.source)


@dataclass
class HeldOutSet:
    """A held-out set of questions, with what it tests (compare and the quickstart report each
    kind apart)."""

    name: str = "in_distribution"
    """Name of the set in the table."""
    source: str = "rg:basic_arithmetic?size=20&seed=10000&max_terms=3&max_digits=2"
    """Questions with answers: .jsonl, .parquet, a directory, or rg:TASK?size=N&seed=S."""
    kind: Literal["in_distribution", "rephrased", "other_family"] = "in_distribution"
    """What the set tests: the training tasks on new seeds; the same skills phrased otherwise;
    task families not trained on that need the same skill. Reported apart."""

    def __post_init__(self):
        check(bool(self.name.strip()), "name: empty; give each held-out set a name")
        check_given(self.source, "source", SOURCE)


@dataclass
class CostConfig:
    usd_per_hour: float = 0.10
    """Price of the hardware the eval runs on, $ per hour (a cloud 2-vCPU VM is ~$0.10, an H100
    ~$2-4): turns measured seconds per answer into $ per 1,000 answers."""
    hardware: str | None = None
    """What that hardware is, for the report (default: detected, e.g. "2-core CPU (x86_64)")."""
    latency_samples: int = 2
    """Questions each model also answers alone (batch of one) to time the latency one user
    sees; 0 skips it."""

    def __post_init__(self):
        check(self.usd_per_hour >= 0, f"usd_per_hour: must be >= 0, got {self.usd_per_hour}")
        check(
            self.latency_samples >= 0,
            f"latency_samples: must be >= 0, got {self.latency_samples}",
        )
