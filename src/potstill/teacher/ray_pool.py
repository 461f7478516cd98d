"""A pool of Ray actors that each load a model once and run batches; the results come back to the
driver in the order the batches were made, so the driver writes exactly what a local run writes.

Ray Core actors, not Ray Data: the output must be byte for byte the local engine's, so the
batches (which records share a padded forward pass) and the order they are written in must be
the local ones, and a batch that fails every retry must come back as that batch, by id, to be
listed in `failed.jsonl`. Actors give all three directly; Ray Data forms its own blocks and
batches, and schedules its own tasks beside the model actors (not tried: actors met every need).

Ray is imported only here, and only when `engine: ray` runs (`import_ray`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.config.engine import RayConfig
from potstill.data.shards import write_records
from potstill.errors import ConfigError, ModelError, import_optional
from potstill.redact import redact

MISSING_RAY = "engine: ray needs Ray: pip install 'potstill[ray]' (or set engine: local)"
PROBE_SECONDS = 900
"""How long a failed batch's actor may take to come back (a restart loads the model again)."""
AHEAD_PER_WORKER = 4
"""Batches dispatched past the oldest unfinished one, per worker: bounds what the driver holds
back to keep the write order while one slow batch finishes."""


def import_ray():
    """The `ray` module, or a one-line ConfigError saying how to install it."""
    return import_optional("ray", ConfigError, MISSING_RAY)


@dataclass
class Failed:
    """A batch that failed every try: its ids and the (redacted, one-line) error."""

    ids: list[str]
    error: str


def one_line(exc: BaseException) -> str:
    """The last line of a (possibly remote) error, redacted: what failed.jsonl keeps."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return redact(f"{type(exc).__name__}: {lines[-1] if lines else ''}")[:500]


def startup_error(exc: BaseException) -> ModelError:
    """A worker that could not start (its model did not load), as potstill's one-line error: the
    worker's own error line (a potstill error: just its message), redacted."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = re.sub(r"^potstill\.errors\.\w+: ", "", lines[-1] if lines else type(exc).__name__)
    return ModelError(redact(f"engine: ray: a worker could not start: {last}")[:1000])


def write_failed(
    run_path: Path,
    failed: Sequence[Failed],
    columns: Sequence[dict] | None = None,
    *,
    name: str = "failed.jsonl",
) -> int:
    """List the ids of the batches that failed every retry in `{run}/failed.jsonl` (id, error;
    before them `columns[i]` for batch i, e.g. an eval's model and task); remove an earlier
    attempt's list once nothing failed (a rerun retried them). Returns how many ids failed. Both
    engines call it: a local rerun of a Ray run clears the list too. `name`: another file name
    (rlt score, which has no run directory, lists them beside its output)."""
    path = Path(run_path) / name
    columns = columns or [{}] * len(failed)
    rows = [
        {**extra, "id": key, "error": batch.error}
        for batch, extra in zip(failed, columns, strict=True)
        for key in batch.ids
    ]
    if rows:
        write_records(path, rows)
    else:
        path.unlink(missing_ok=True)
    return len(rows)


class Cluster:
    """Joins `ray.address`, or starts a local cluster of exactly the pool's CPUs (and GPUs);
    `close` leaves it (stopping a cluster it started). An already connected driver (a library
    user's own `ray.init`) is used as it is and left connected."""

    def __init__(self, cfg: RayConfig):
        self.ray = ray = import_ray()
        self.owned = not ray.is_initialized()
        if not self.owned:
            return
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        with _keep_sigterm():
            if cfg.address:  # its nodes have potstill installed (docs/scale_out.md)
                _check_reachable(cfg.address)
                try:
                    ray.init(address=cfg.address, **quiet)
                except (ConnectionError, RuntimeError, ray.exceptions.RayError) as exc:
                    raise ConfigError(
                        f"ray.address: could not join the cluster at {cfg.address} "
                        f"({one_line(exc)}); check that it runs (ray status) and the address"
                    ) from None
                return
            ray.init(
                address="local",  # a new cluster, even where `ray start` left one running
                num_cpus=cfg.num_workers * cfg.num_cpus_per_worker,
                num_gpus=cfg.num_workers * cfg.num_gpus_per_worker,
                # workers import the potstill this process runs (a source checkout's too)
                runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_import_path())}},
                **quiet,
            )

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()


def _check_reachable(address: str, seconds: float = 10.0) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) nothing listens on at once: Ray itself retries
    connecting for minutes before it gives up. "auto" and other forms are left to Ray."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d+)/?", address.strip())
    if not match:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=seconds).close()
    except OSError as exc:
        raise ConfigError(
            f"ray.address: nothing answers at {address} ({exc.strerror or exc}); start the "
            "cluster (ray start --head) or fix the address, or set ray.address: null for a "
            "local cluster"
        ) from None


@contextlib.contextmanager
def _keep_sigterm():
    """Ray's core worker installs its own SIGTERM handler, which kills the driver at once (exit
    -15, a C++ stack dump); put the CLI's back, so SIGTERM still stops cleanly (shards flushed,
    exit 130) and the actors and the cluster are stopped on the way out."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main else None
    try:
        yield
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _import_path() -> list[str]:
    root = str(Path(__file__).resolve().parents[2])  # the directory potstill is imported from
    extra = os.environ.get("PYTHONPATH", "")
    return [root, *(os.path.abspath(p) for p in extra.split(os.pathsep) if p)]


class PoolWorker:
    """Base of every actor class: `pid` (on the control thread) is how the pool probes an actor
    and how tests find the process to kill."""

    def pid(self) -> int:
        return os.getpid()


class Pool:
    """`num_workers` actors of `worker_cls(*args)` (a `PoolWorker`), each holding its model, on
    the cluster `cfg` names (`Cluster`, joined or started here); `run` streams the results of
    `method` over batches back in batch order. `close` stops the actors, then the cluster if it
    was started here; a second `close` does nothing. Actor `i` is named `potstill-worker-{i}`
    in this driver's namespace (tests find its process through it)."""

    def __init__(self, cfg: RayConfig, worker_cls: type, *args: Any):
        self.cluster = Cluster(cfg)
        self.ray = ray = self.cluster.ray
        self.actors: list = []
        remote = ray.remote(
            num_cpus=cfg.num_cpus_per_worker,
            num_gpus=cfg.num_gpus_per_worker,
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_task_retries,
            # a control thread beside the work: pid() answers while a batch runs
            concurrency_groups={"control": 1},
        )(worker_cls)
        try:
            self.actors = [
                remote.options(name=f"potstill-worker-{i}").remote(*args)
                for i in range(cfg.num_workers)
            ]
            # every actor loaded its model (asked once: a failed load is not retried)
            ray.get([a.pid.options(max_task_retries=0).remote() for a in self.actors])
        except ray.exceptions.RayError as exc:
            self.close()
            raise startup_error(exc) from None
        except BaseException:
            self.close()
            raise

    def call(self, index: int, method: str, *args: Any) -> Any:
        """One call on actor `index`, waited for (set-up questions: the context length...)."""
        return self.ray.get(getattr(self.actors[index], method).remote(*args))

    def run(
        self, method: str, batches: Sequence[Any], *args: Any
    ) -> Iterator[tuple[int, Any | Failed]]:
        """(batch index, result or Failed) for every batch, in index order. Ray retries a batch
        (max_task_retries, restarting a dead actor up to max_restarts times); a batch whose actor
        is then gone for good runs on another; one that fails otherwise comes back Failed."""
        ray = self.ray
        alive = list(range(len(self.actors)))
        free, waiting, done = list(alive), {}, {}
        todo, emit = deque(range(len(batches))), 0  # a requeued batch goes first
        while emit < len(batches):
            ahead = emit + AHEAD_PER_WORKER * max(len(alive), 1)
            while free and todo and todo[0] < ahead:
                index, actor = todo.popleft(), free.pop(0)
                ref = getattr(self.actors[actor], method).options(retry_exceptions=True)
                waiting[ref.remote(batches[index], *args)] = (index, actor)
            if not waiting and not alive:  # every actor died for good: nothing can run
                for index in todo:
                    done[index] = Failed(_ids(batches[index]), "every Ray worker died")
                todo.clear()
            if waiting:
                (ref,), _ = ray.wait(list(waiting), num_returns=1)
                index, actor = waiting.pop(ref)
                try:
                    done[index] = ray.get(ref)
                    free.append(actor)
                except ray.exceptions.RayError as exc:
                    self._failed(exc, index, actor, todo, done, alive, free, batches)
            while emit in done:
                yield emit, done.pop(emit)
                emit += 1

    def _failed(self, exc, index, actor, todo, done, alive, free, batches) -> None:
        """Book a batch that failed on `actor` after Ray's own retries: if the actor is gone for
        good (restarts used up), another one runs the batch; else the batch failed."""
        if self._alive(actor):
            free.append(actor)
        else:
            alive.remove(actor)
            if alive:
                todo.appendleft(index)
                return
        done[index] = Failed(_ids(batches[index]), one_line(exc))

    def _alive(self, actor: int) -> bool:
        """Whether the actor answers (after a restart, if Ray is restarting it)."""
        try:
            self.ray.get(self._pid_ref(actor), timeout=PROBE_SECONDS)
        except (self.ray.exceptions.RayError, TimeoutError):
            return False
        return True

    def _pid_ref(self, actor: int):
        return self.actors[actor].pid.options(concurrency_group="control").remote()

    def close(self) -> None:
        actors, self.actors = self.actors, []
        try:
            for actor in actors:
                try:
                    self.ray.kill(actor)
                except Exception:  # noqa: S110 (already gone: nothing to release)
                    pass
        finally:
            self.cluster.close()


def _ids(batch: Any) -> list[str]:
    return [item.key if hasattr(item, "key") else item[0] for item in batch]


def worker_pid(index: int) -> int:
    """The process id of actor `index` of this driver's running pool (tests kill one)."""
    ray = import_ray()
    actor = ray.get_actor(f"potstill-worker-{index}")
    return ray.get(actor.pid.options(concurrency_group="control").remote())
