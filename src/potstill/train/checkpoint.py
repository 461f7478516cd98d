"""Checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG, data position.

    checkpoints/step-000020/
        trainable.safetensors   the parameters being trained (LoRA adapters, or all weights)
        optimizer.pt            optimizer state (tensors + numbers; loaded with weights_only=True)
        scheduler.json          the LR scheduler's state
        rng.pt                  torch CPU (and CUDA) generator states
        state.json              step, micro-batches consumed, tokens seen, trainer state (JSON);
                                written last = complete

A checkpoint is written into a temporary directory and renamed into place, so a kill leaves either
the previous checkpoint or the new one, never half of one. No pickle anywhere.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from potstill.errors import ConfigError, DataError
from potstill.fsutil import atomic_write_text, fsync_dir

STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class LoopState:
    step: int = 0
    """Optimizer steps taken."""
    micro_batches: int = 0
    """Micro-batches consumed (the data position, counted over all processes)."""
    tokens: int = 0
    """Target tokens trained on."""
    extra: dict = field(default_factory=dict)
    """A trainer's own JSON state (`StepHooks.state_dict`), e.g. the EMAs of a dynamic α."""


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().contiguous().cpu()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def save_checkpoint(
    directory: Path, state: LoopState, model, optimizer, scheduler, *, keep: int = 2
) -> Path:
    """Write `directory/step-NNNNNN` atomically; keep the newest `keep` checkpoints."""
    final = directory / f"step-{state.step:06d}"
    tmp = directory / f".tmp-step-{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    torch.save(rng_state(), tmp / "rng.pt")
    atomic_write_text(tmp / "state.json", json.dumps(asdict(state)))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary leftovers of a kill are ignored)."""
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def check_resumable(run_dir: str | Path) -> None:
    """`--resume` with nothing to resume: refused before any loading, with nothing written."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not list_checkpoints(ckpt_dir):
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start")


def load_checkpoint(path: Path, model, optimizer, scheduler) -> LoopState:
    """Restore everything `save_checkpoint` wrote; the model's trainable names must match."""
    try:
        weights = load_file(path / "trainable.safetensors")
        optim_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = torch.load(path / "rng.pt", weights_only=True)
        scheduler_state = json.loads((path / "scheduler.json").read_text())
        state = LoopState(**json.loads((path / "state.json").read_text()))
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"{path}: unreadable checkpoint ({exc}); delete this step directory to resume "
            "from the one before"
        ) from None
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise DataError(
            f"{path}: checkpoint has parameters the model lacks (e.g. {missing[0]}); "
            "it was made with another model or LoRA setting"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(scheduler_state)
    set_rng_state(rng)
    return state


def rng_state() -> dict[str, torch.Tensor]:
    """The torch CPU (and CUDA) generator states: what dropout draws from."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return rng


def set_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
