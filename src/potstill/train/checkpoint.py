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

import contextlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
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
    """Write `directory/step-NNNNNN` atomically; keep the newest `keep` checkpoints. A write that
    fails (a full disk) leaves no temporary directory and raises OSError naming the file."""
    final = directory / f"step-{state.step:06d}"
    tmp = directory / f".tmp-step-{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        with _naming_os_errors(tmp / "trainable.safetensors") as path:
            save_file(trainable_state(model), path)
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        with _naming_os_errors(tmp / "scheduler.json") as path:
            path.write_text(json.dumps(scheduler.state_dict()))
        _torch_save(rng_state(), tmp / "rng.pt")
        atomic_write_text(tmp / "state.json", json.dumps(asdict(state)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # half a checkpoint only takes disk space
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class _KeepsOSError(io.RawIOBase):
    """A file `torch.save` writes through that keeps the OSError of a failed write: torch turns
    it into a RuntimeError without the errno, so a full disk would look like a bug."""

    def __init__(self, file):
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise


def _torch_save(obj, path: Path) -> None:
    with _naming_os_errors(path):
        with open(path, "wb") as raw:
            file = _KeepsOSError(raw)
            try:
                torch.save(obj, file)
            except RuntimeError:
                if file.error is None:
                    raise
                raise file.error from None


@contextlib.contextmanager
def _naming_os_errors(path: Path) -> Iterator[Path]:
    """OSErrors of writing `path` carry its name (the CLI prints it); safetensors reports an OS
    error only in its message ("... (os error 28)"): that becomes the OSError it was."""
    try:
        yield path
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    except SafetensorError as exc:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


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


UNREADABLE = (OSError, ValueError, RuntimeError, TypeError, KeyError, SafetensorError)
"""What reading a truncated or foreign checkpoint file raises (ValueError covers bad JSON)."""
MISFIT = (ValueError, RuntimeError, TypeError, KeyError, IndexError, AttributeError)
"""What restoring a state that is not the one save_checkpoint wrote raises."""


def load_checkpoint(path: Path, model, optimizer, scheduler) -> LoopState:
    """Restore everything `save_checkpoint` wrote; the model's trainable names must match. A
    file that is truncated, or not what `save_checkpoint` wrote, is refused naming it."""
    weights, optim_state, rng, scheduler_state, state = _read_checkpoint(path)
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise DataError(
            f"{path}: checkpoint has parameters the model lacks (e.g. {missing[0]}); "
            "it was made with another model or LoRA setting"
        )
    for name, tensor in weights.items():
        if tensor.shape != params[name].shape:
            raise DataError(
                f"{path}: parameter {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"{tuple(params[name].shape)} in the model; it was made with another model"
            )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    with _refusing_misfit(path / "optimizer.pt"):
        optimizer.load_state_dict(optim_state)
        _check_optimizer_shapes(getattr(optimizer, "optimizer", optimizer))
    with _refusing_misfit(path / "scheduler.json"):
        scheduler.load_state_dict(scheduler_state)
    with _refusing_misfit(path / "rng.pt"):
        if not (isinstance(rng, dict) and torch.is_tensor(rng.get("cpu"))):
            raise TypeError(f"a {type(rng).__name__}, not the generator states")
        set_rng_state(rng)
    return state


def _read_checkpoint(path: Path) -> tuple:
    """The five parts of a checkpoint, read (not yet applied)."""
    try:
        weights = load_file(path / "trainable.safetensors")
        optim_state = _torch_load(path / "optimizer.pt")
        rng = _torch_load(path / "rng.pt")
        scheduler_state = json.loads((path / "scheduler.json").read_text())
        state = LoopState(**json.loads((path / "state.json").read_text()))
        counts = (state.step, state.micro_batches, state.tokens)
        if not all(type(n) is int for n in counts) or not isinstance(state.extra, dict):
            raise TypeError("state.json: step, micro_batches and tokens must be integers")
    except DataError:  # _torch_load's, already worded (and a ValueError)
        raise
    except UNREADABLE as exc:
        raise _unreadable(path, exc) from None
    return weights, optim_state, rng, scheduler_state, state


def _torch_load(file: Path):
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as exc:  # a torn or foreign file: RuntimeError, UnpicklingError, EOFError...
        raise _unreadable(file.parent, exc) from None


def _unreadable(path: Path, exc: BaseException) -> DataError:
    return DataError(
        f"{path}: unreadable checkpoint ({_one_line(exc)}); delete this step directory to "
        "resume from the one before"
    )


@contextlib.contextmanager
def _refusing_misfit(file: Path) -> Iterator[None]:
    try:
        yield
    except MISFIT as exc:
        raise DataError(
            f"{file}: not the state this run's training saves ({_one_line(exc)}); delete the "
            "step directory to resume from the one before"
        ) from None


def _check_optimizer_shapes(optimizer) -> None:
    """A loaded optimizer state of another model loads without a word, and fails the next step:
    every state tensor (Adam's moments) must have its parameter's shape."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                    raise ValueError(
                        f"state '{key}' has shape {tuple(value.shape)}, its parameter "
                        f"{tuple(param.shape)}"
                    )


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


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
