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
from potstill.errors import ConfigError, TrainingError
from potstill.runs import RunDir
from potstill.train.checkpoint import (
    LoopState,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from potstill.train.processes import make_accelerator, start_trackers, teardown

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


@dataclass
class Session:
    """Everything one `train` call holds between steps."""

    accelerator: Any
    model: Any
    """The wrapped model (DDP under a multi-process launch)."""
    optimizer: Any
    scheduler: Any
    plan: DataPlan
    steps: int
    state: LoopState
    ckpt_dir: Any
    rng_at_step: dict = field(default_factory=dict)
    """The RNG as the last finished step left it (what a checkpoint keeps)."""
    last: dict[str, float] = field(default_factory=dict)
    start: float = 0.0
    start_tokens: int = 0
    grad_accum: int = 1

    @property
    def window(self) -> int:
        """Micro-batches per optimizer step, over all processes."""
        return self.grad_accum * self.accelerator.num_processes


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
    accelerator = make_accelerator(cfg, run, log_with)
    finished = False
    try:
        s = _prepare(cfg, accelerator, model, len(examples), run, console, require_checkpoint)
        hooks.load_state_dict(s.state.extra)
        try:
            _run_steps(s, cfg, examples, collate, count_tokens, loss_fn, run, hooks, console)
        except KeyboardInterrupt:
            # Stop cleanly at the last finished step: its weights and data position still
            # agree. The interrupted step's dropout has drawn from the RNG since: rewind it, or
            # the resumed run would draw other masks than an uninterrupted one.
            s.optimizer.zero_grad(set_to_none=True)
            set_rng_state(s.rng_at_step)
            _save(s, cfg)
            raise
        finished = True
        return {"step": s.state.step, "steps": s.steps, "tokens": s.state.tokens, **s.last}
    finally:
        s = None  # the wrapper goes in teardown, not in a destructor
        teardown(accelerator, wait=finished)


def _run_steps(s: Session, cfg, examples, collate, count_tokens, loss_fn, run, hooks, console):
    """The steps from the checkpoint (or 0) to the end, top to bottom."""
    with _progress(console, s.accelerator) as progress:
        bar = progress.add_task("train", total=s.steps, completed=s.state.step, info="")
        while s.state.step < s.steps:
            hooks.before_step(s.state.step, s.steps)
            batches = _window_batches(s, examples, collate, hooks)
            sums, window_tokens = _accumulate(s, batches, count_tokens, loss_fn)
            # The step, its bookkeeping and its log line happen together or not at all: an
            # interrupt in between would checkpoint the weights of step n as step n - 1.
            with _deferred_interrupts():
                _optimizer_step(s, cfg, sums, window_tokens, hooks)
                if s.accelerator.is_main_process:
                    _append_metrics(run.path / "metrics.jsonl", {"step": s.state.step, **s.last})
                run.logger.info("step %d %s", s.state.step, _fmt(s.last))
                progress.update(bar, completed=s.state.step, info=_fmt(s.last, short=True))
            if s.state.step % cfg.save_every == 0 or s.state.step == s.steps:
                _save(s, cfg)


def _prepare(cfg, accelerator, model, num_examples, run, console, require_checkpoint) -> Session:
    """Data plan, optimizer, schedule and the wrapped model; the newest checkpoint loaded."""
    from transformers import get_scheduler

    torch.manual_seed(cfg.seed)  # dropout; a resumed run restores the checkpoint's RNG instead
    world = accelerator.num_processes
    plan = DataPlan(num_examples, cfg.micro_batch_size, cfg.seed)
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
        if accelerator.is_main_process:
            console.print(f"resuming from {found[-1]} (step {state.step} of {steps})")
    elif require_checkpoint:
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start")
    start_trackers(accelerator)
    model.train()
    return Session(
        accelerator, model, optimizer, scheduler, plan, steps, state, ckpt_dir,
        rng_at_step=rng_state(), start=time.perf_counter(), start_tokens=state.tokens,
        grad_accum=cfg.grad_accum,
    )  # fmt: skip


def _progress(console, accelerator) -> Progress:
    return Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not accelerator.is_main_process,
    )


def _window_batches(s: Session, examples, collate, hooks: StepHooks) -> list[dict]:
    """This process's micro-batches of the next step: global indices rank, rank + world, ..."""
    accelerator, first = s.accelerator, s.state.micro_batches
    world, rank = accelerator.num_processes, accelerator.process_index
    policy = accelerator.unwrap_model(s.model)
    return [
        collate(hooks.rollout(policy, m, [examples[i] for i in s.plan.indices(m)]))
        for m in range(first + rank, first + s.window, world)
    ]


def _accumulate(s: Session, batches, count_tokens, loss_fn) -> tuple[dict[str, float], int]:
    """Forward and backward over the micro-batches; gradients synced on the last one only.
    Returns this process's summed logged values and the window's target tokens."""
    accelerator, world = s.accelerator, s.accelerator.num_processes
    tokens = torch.tensor(sum(count_tokens(b) for b in batches), device=accelerator.device)
    window_tokens = int(accelerator.reduce(tokens, "sum").item())
    sums: dict[str, float] = {}
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(s.model):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            loss, parts = loss_fn(s.model, batch, max(window_tokens, 1))
            # DDP averages gradients over processes; the loss is already a global mean.
            accelerator.backward(loss * world)
        for key, value in {"loss": loss.item(), **parts}.items():
            sums[key] = sums.get(key, 0.0) + value
    return sums, window_tokens


def _optimizer_step(s: Session, cfg, sums: dict[str, float], window_tokens: int, hooks) -> None:
    """Clip, step, schedule, then the bookkeeping of the finished step (state, hooks, RNG, log).
    A non-finite loss or gradient stops the run before the step: the weights on disk stay the
    last good checkpoint's."""
    accelerator, state = s.accelerator, s.state
    totals = {k: _global_sum(accelerator, v) for k, v in sums.items()}
    grad_norm = _clip(accelerator, s.model, cfg.max_grad_norm)
    if not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm)):
        saved = list_checkpoints(s.ckpt_dir)
        kept = f"the last good checkpoint is {saved[-1].name}" if saved else "no checkpoint yet"
        raise TrainingError(
            f"step {state.step + 1}: the loss is {totals['loss']:g} and the gradient norm "
            f"{grad_norm:g}; training stopped before the step ({kept}); lower train.lr "
            f"(now {cfg.lr:g}) or set train.max_grad_norm"
        )
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.micro_batches += s.window
    state.tokens += window_tokens
    elapsed = time.perf_counter() - s.start
    s.last = {
        **totals,
        "lr": s.scheduler.get_last_lr()[0],
        "grad_norm": grad_norm,
        "tokens_per_s": (state.tokens - s.start_tokens) / max(elapsed, 1e-9),
    }
    hooks.after_step(state.step, s.last)
    state.extra = hooks.state_dict()
    s.rng_at_step = rng_state()
    accelerator.log(s.last, step=state.step)


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


def _save(s: Session, cfg) -> None:
    accelerator = s.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and s.state.step > 0:
        unwrapped = accelerator.unwrap_model(s.model)
        save_checkpoint(
            s.ckpt_dir, s.state, unwrapped, s.optimizer, s.scheduler, keep=cfg.keep_checkpoints
        )
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
