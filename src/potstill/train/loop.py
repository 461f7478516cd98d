"""The training loop every trainer shares (SFT, distillation, the RLT warm-up), on `accelerate`.

One optimizer step = `grad_accum` micro-batches on each process. The loss function returns the
window's *sum* of per-token losses divided by the number of target tokens in the whole window (all
micro-batches, all processes), so the gradient is the same however the window is split into
micro-batches or processes. The data order is a pure function of (seed, epoch), and a micro-batch
is addressed by its global index, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from potstill.config.sections import TrainConfig
from potstill.runs import RunDir
from potstill.train.checkpoint import (
    LoopState,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

LossFn = Callable[[Any, dict, int], tuple[torch.Tensor, dict[str, float]]]
"""(model, micro_batch, target_tokens_in_window) -> (normalised loss, parts to log)."""


class StepHooks:
    """What a trainer may add to the shared loop; the defaults do nothing.

    Everything here must be a pure function of the step, the micro-batch index and the trainer's
    own state (saved in each checkpoint), so a resumed run repeats an uninterrupted one exactly.
    """

    def rollout(self, model, micro_batch: int, items: list) -> list:
        """Replace a micro-batch's examples before collation (on-policy samples, say); runs with
        the weights of the step about to be taken."""
        return items

    def before_step(self, step: int, steps: int) -> None:
        """Called before the micro-batches of optimizer step `step` (0-based) of `steps`."""

    def after_step(self, step: int, logged: dict[str, float]) -> None:
        """Called after optimizer step `step` (1-based) with the window's logged values."""

    def state_dict(self) -> dict:
        """JSON-able state to checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output on resume."""


@dataclass
class DataPlan:
    """Micro-batches by global index: epoch e is a seeded permutation of the examples."""

    num_examples: int
    micro_batch_size: int
    seed: int
    _perms: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.micro_batch_size)

    def indices(self, micro_batch: int) -> list[int]:
        epoch, j = divmod(micro_batch, self.per_epoch)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._perms = {epoch: torch.randperm(self.num_examples, generator=gen).tolist()}
        return self._perms[epoch][j * self.micro_batch_size : (j + 1) * self.micro_batch_size]


def total_steps(cfg: TrainConfig, plan: DataPlan, world_size: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * plan.per_epoch / (cfg.grad_accum * world_size)))


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


def train(
    *,
    cfg: TrainConfig,
    model,
    examples: Sequence[Any],
    collate: Callable[[list[Any]], dict],
    count_tokens: Callable[[dict], int],
    loss_fn: LossFn,
    run: RunDir,
    log_with: list[str],
    console: Console,
    require_checkpoint: bool = False,
    hooks: StepHooks | None = None,
) -> dict:
    """Train until the planned number of steps; checkpoint every `save_every`; resume if a
    checkpoint exists. Returns the final state and last logged values."""
    hooks = hooks or StepHooks()
    from transformers import get_scheduler

    accelerator = make_accelerator(cfg, run, log_with)
    torch.manual_seed(cfg.seed)  # dropout; a resumed run restores the checkpoint's RNG instead
    world, rank = accelerator.num_processes, accelerator.process_index
    plan = DataPlan(len(examples), cfg.micro_batch_size, cfg.seed)
    steps = total_steps(cfg, plan, world)
    run.count(processes=world, global_batch=cfg.micro_batch_size * cfg.grad_accum * world)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        "cosine" if cfg.lr_schedule == "cosine" else cfg.lr_schedule,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * steps),
        num_training_steps=steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    state, ckpt_dir = LoopState(), run.path / "checkpoints"
    found = list_checkpoints(ckpt_dir)
    if found:
        state = load_checkpoint(found[-1], accelerator.unwrap_model(model), optimizer, scheduler)
        hooks.load_state_dict(state.extra)
        if accelerator.is_main_process:
            console.print(f"resuming from {found[-1]} (step {state.step} of {steps})")
    elif require_checkpoint:
        from potstill.errors import ConfigError

        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start")
    accelerator.init_trackers("train")
    rng_at_step = rng_state()  # the RNG as the last finished step left it (what a checkpoint keeps)
    model.train()
    last: dict[str, float] = {}
    start, start_tokens = time.perf_counter(), state.tokens
    window = cfg.grad_accum * world
    progress = Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not accelerator.is_main_process,
    )
    finished = False
    try:
        with progress:
            bar = progress.add_task("train", total=steps, completed=state.step, info="")
            while state.step < steps:
                hooks.before_step(state.step, steps)
                first = state.micro_batches
                mine = [
                    collate(
                        hooks.rollout(
                            accelerator.unwrap_model(model),
                            m,
                            [examples[i] for i in plan.indices(m)],
                        )
                    )
                    for m in range(first + rank, first + window, world)
                ]
                tokens = torch.tensor(sum(count_tokens(b) for b in mine), device=accelerator.device)
                window_tokens = int(accelerator.reduce(tokens, "sum").item())
                sums: dict[str, float] = {}
                for i, batch in enumerate(mine):
                    sync = i == len(mine) - 1
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                        loss, parts = loss_fn(model, batch, max(window_tokens, 1))
                        # DDP averages gradients over processes; the loss is already a global mean.
                        accelerator.backward(loss * world)
                    for key, value in {"loss": loss.item(), **parts}.items():
                        sums[key] = sums.get(key, 0.0) + value
                # The step, its bookkeeping and its log line happen together or not at all: an
                # interrupt in between would checkpoint the weights of step n as step n - 1.
                with _deferred_interrupts():
                    grad_norm = _clip(accelerator, model, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.step += 1
                    state.micro_batches += window
                    state.tokens += window_tokens
                    elapsed = time.perf_counter() - start
                    last = {
                        **{k: _global_sum(accelerator, v) for k, v in sums.items()},
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "tokens_per_s": (state.tokens - start_tokens) / max(elapsed, 1e-9),
                    }
                    hooks.after_step(state.step, last)
                    state.extra = hooks.state_dict()
                    rng_at_step = rng_state()
                    accelerator.log(last, step=state.step)
                    if accelerator.is_main_process:
                        _append_metrics(run.path / "metrics.jsonl", {"step": state.step, **last})
                    run.logger.info("step %d %s", state.step, _fmt(last))
                    progress.update(bar, completed=state.step, info=_fmt(last, short=True))
                if state.step % cfg.save_every == 0 or state.step == steps:
                    _save(accelerator, ckpt_dir, state, model, optimizer, scheduler, cfg)
        finished = True
    except KeyboardInterrupt:
        # Stop cleanly at the last finished step: its weights and data position still agree.
        # The interrupted step's dropout has drawn from the RNG since: rewind it, or the resumed
        # run would draw other masks than an uninterrupted one.
        optimizer.zero_grad(set_to_none=True)
        set_rng_state(rng_at_step)
        _save(accelerator, ckpt_dir, state, model, optimizer, scheduler, cfg)
        raise
    finally:
        del model, optimizer, scheduler  # the wrapper goes in teardown, not in a destructor
        teardown(accelerator, wait=finished)
    return {"step": state.step, "steps": steps, "tokens": state.tokens, **last}


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


@contextlib.contextmanager
def _deferred_interrupts():
    """Hold Ctrl-C/SIGTERM until the block ends, then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


def _save(accelerator, ckpt_dir, state, model, optimizer, scheduler, cfg) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and state.step > 0:
        unwrapped = accelerator.unwrap_model(model)
        save_checkpoint(ckpt_dir, state, unwrapped, optimizer, scheduler, keep=cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def _append_metrics(path, values: dict) -> None:
    """One JSON line per step (a resumed run appends the steps it redoes; the last one counts)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(values) + "\n")


def read_metrics(path) -> dict[int, dict]:
    """Step -> logged values, the last entry winning for steps redone after a resume."""
    out: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                out[entry["step"]] = entry
    return out


def _clip(accelerator, model, max_norm: float) -> float:
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _global_sum(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor(value, device=accelerator.device), "sum"))


def _fmt(values: dict[str, float], short: bool = False) -> str:
    keys = ("loss", "tokens_per_s") if short else values
    return " ".join(f"{k}={values[k]:.4g}" for k in keys if k in values)
