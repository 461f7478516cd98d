"""Where a record stage's work runs: `engine: local` (this process) or `engine: ray` (an actor
pool on a Ray cluster, the driver writing every result). `generate` and `teacher cache` share it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from potstill.config.loader import check

Engine = Literal["local", "ray"]
"""local: the model runs in this process; ray: in a pool of Ray actors (`pip install
'potstill[ray]'`), this process writes the results into the same run directory."""


@dataclass
class RayConfig:
    """The Ray actor pool of `engine: ray` (docs/scale_out.md, "On Ray")."""

    num_workers: int = 2
    """Actors, each loading the model once (one per GPU, or per tensor-parallel group)."""
    num_cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each actor (its torch threads on CPU)."""
    num_gpus_per_worker: float = 0.0
    """GPUs Ray reserves for each actor (backend.vllm.tensor_parallel_size for vLLM)."""
    address: str | None = None
    """A running cluster to join ("auto", or ray://host:10001); null starts a local one with
    num_workers × num_cpus_per_worker CPUs and stops it at the end."""
    max_restarts: int = 3
    """Times Ray restarts an actor whose process died (the model is loaded again)."""
    max_task_retries: int = 3
    """Times Ray retries a batch after its actor died or the batch raised; a batch failing every
    try lands in the run directory's failed.jsonl (ids and error) and a rerun tries it again."""

    def __post_init__(self):
        check(
            isinstance(self.num_workers, int) and self.num_workers > 0,
            f"num_workers: must be a positive integer, got {self.num_workers}",
        )
        check(
            math.isfinite(self.num_cpus_per_worker) and self.num_cpus_per_worker > 0,
            f"num_cpus_per_worker: must be a finite number > 0, got {self.num_cpus_per_worker}",
        )
        check(
            math.isfinite(self.num_gpus_per_worker) and self.num_gpus_per_worker >= 0,
            f"num_gpus_per_worker: must be a finite number >= 0, got {self.num_gpus_per_worker}",
        )
        check(
            self.address is None or bool(self.address.strip()),
            "address: empty; give auto, ray://HOST:10001, or null for a local cluster",
        )
        check(self.max_restarts >= 0, f"max_restarts: must be >= 0, got {self.max_restarts}")
        check(
            self.max_task_retries >= 0,
            f"max_task_retries: must be >= 0, got {self.max_task_retries}",
        )
