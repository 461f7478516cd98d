"""Which process this is, when `accelerate launch` (torchrun underneath) started several.

    accelerate launch --config_file configs/accelerate/cpu-2proc.yaml -m potstill sft -c sft.yaml

Read from the launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE; mpirun's PMI_*/OMPI_*), so a
stage can tell its main process before `accelerate` starts the process group: the run directory,
its manifest, logs, metrics, checkpoints and the final model are written by the main process only,
and the others wait for it where they need what it wrote.
"""

from __future__ import annotations

import os

from potstill.errors import ConfigError


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def world_size() -> int:
    """Processes the launcher started (1 when run directly)."""
    return _env_int(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1)


def process_rank() -> int:
    """This process's global rank (0 when run directly)."""
    return _env_int(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0)


def local_rank() -> int:
    """This process's rank on its machine: the GPU it owns."""
    return _env_int(("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"), 0)


def is_main_process() -> bool:
    return process_rank() == 0


def use_cpu() -> bool:
    """Run the process group on CPU (gloo): asked for (ACCELERATE_USE_CPU), or several processes
    and no GPU. Without the second case a CPU machine launched with `--multi_gpu` would start N
    independent single-process runs, all writing one run directory."""
    import torch

    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return asked or (world_size() > 1 and not torch.cuda.is_available())


def auto_device() -> str:
    """What device "auto" means in this process: its own GPU under a multi-process launch."""
    import torch

    if use_cpu() or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_rank()}" if world_size() > 1 else "cuda"


def check_launch() -> None:
    """Refuse the one launch that silently runs fewer processes than asked: `accelerate launch
    --cpu --num_processes N` without mpirun starts one process (it sets MASTER_ADDR for N, but
    no rank)."""
    cpu_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu_launch and os.environ.get("MASTER_ADDR") and world_size() == 1:
        if not os.environ.get("RANK") and not os.environ.get("LOCAL_RANK"):
            raise ConfigError(
                "`accelerate launch --cpu --num_processes N` starts a single process unless run "
                "under mpirun; for N CPU processes use `accelerate launch --config_file "
                "configs/accelerate/cpu-2proc.yaml` (see docs/scale_out.md)"
            )


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
