"""The accelerator a training run starts, and the explicit teardown that ends it."""

from __future__ import annotations

import torch

from potstill.config.sections import TrainConfig
from potstill.runs import RunDir


def make_accelerator(cfg: TrainConfig, run: RunDir, log_with: list[str]):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from potstill.distributed import check_launch, use_cpu, world_size

    check_launch()
    cpu = use_cpu()
    precision = cfg.precision
    if precision == "auto":
        bf16 = not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16 else "fp32"
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision="no" if precision == "fp32" else precision,
        log_with=log_with or None,
        project_config=ProjectConfiguration(
            project_dir=str(run.path), logging_dir=str(run.path / "logs")
        ),
    )
    if accelerator.num_processes != world_size():
        from potstill.errors import ConfigError

        raise ConfigError(
            f"the launcher started {world_size()} processes but accelerate joined "
            f"{accelerator.num_processes}; set ACCELERATE_USE_CPU=1 to train on CPU processes"
        )
    return accelerator


def start_trackers(accelerator) -> None:
    """Start the trackers of `run.log_with` (installed: `config.trackers` checked that). One that
    is installed but cannot start (W&B with no API key and no offline mode, MLflow 3 refusing a
    file store without MLFLOW_ALLOW_FILE_STORE) is a one-line error, not a traceback: the fix is
    in the user's environment."""
    from potstill.errors import ConfigError

    try:
        accelerator.init_trackers("train")
    except Exception as exc:
        lines = str(exc).strip().splitlines() or [""]
        raise ConfigError(
            f"run.log_with: starting the trackers ({', '.join(_names(accelerator))}) failed: "
            f"{type(exc).__name__}: {lines[0]}; fix the tracker's settings or drop it from "
            "run.log_with"
        ) from exc


def _names(accelerator) -> list[str]:
    return [str(getattr(t, "value", t)) for t in accelerator.log_with or []]


def teardown(accelerator, *, wait: bool) -> None:
    """End a (multi-process) run in order: wait for every process, release the wrapped model,
    destroy the process group.

    Left to the garbage collector, the DDP wrapper's destructor drops the last reference to the
    gloo process group while holding the GIL, and gloo joins a worker thread that needs the GIL
    to finish its last barrier: the process hangs forever (seen in CI). accelerate's
    `end_training` destroys the group while the wrapper still lives, so it is not used; the
    trackers are finished here instead. `wait=False` after an error: another process may be
    gone, and a barrier would never return.
    """
    import gc

    import torch.distributed as dist

    if wait:
        accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.free_memory()  # drops accelerate's references to the wrapper and optimizer
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        from accelerate.state import AcceleratorState

        dist.destroy_process_group()
        # The next trainer in this process (quickstart, compare) starts a fresh group.
        AcceleratorState._reset_state(reset_partial_state=True)
