"""Run directories: resolved config, manifest (inputs with hashes, versions, counts, timings), logs.

Rerunning a command on the same directory resumes it: the manifest gains an attempt, shards are
kept. A directory made with a different config, or holding work done on inputs that have changed
since, is refused, since its shards would mix two jobs. One process writes a run directory at a
time (a lock), and what is stored there never holds a credential (`potstill.redact`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from potstill.config import dump_yaml
from potstill.errors import ConfigError
from potstill.fsutil import LockHeld, atomic_write_text, try_lock, unlock
from potstill.redact import redact, redact_data
from potstill.run_checks import (
    check_output_dir,
    check_same_config,
    check_same_inputs,
    describe_input,
    package_versions,
    read_manifest,
)

LOCK = ".run.lock"
"""The run directory's lock file: held by the process writing the directory (it holds that
process's pid), and removed when it is done; one killed leaves it, free, for the next."""


class RunDir:
    """A run directory: `config.yaml`, `manifest.json`, `logs/run.log`, and the stage's outputs.

    The process writing it holds its lock (`.run.lock`) for the RunDir's life, so a second
    writer is refused instead of sharing its temp files; the OS drops the lock however the
    process ends. Under a multi-process launch only the main process takes the lock and writes;
    the others get the same object with writing switched off (and a logger that drops its
    lines). Every process makes the same read-only checks first, so all refuse together."""

    def __init__(
        self, path: str | Path, *, command: str, config, inputs: list[str] = (),
        growable: tuple[str, ...] = (),
    ):  # fmt: skip
        from potstill.distributed import is_main_process

        self.path = check_output_dir(path, config, list(inputs))
        self.manifest_path = self.path / "manifest.json"
        # Read-only checks first: a refused rerun leaves the directory exactly as it was.
        grown = check_same_config(self.path, config, growable)
        described = [describe_input(s) for s in inputs]
        check_same_inputs(self.path, config, described)
        self.writer = is_main_process()
        self._lock = None
        if not self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {"command": command, "attempts": [{}], "counts": {}, "timings": {}}
            self.logger = logging.getLogger("potstill.run.follower")
            self.logger.disabled = True
            return
        self._lock = _lock_run_dir(self.path)
        try:
            self._start(command, config, described, rewrite_config=grown)
        except BaseException:
            self._release()
            raise

    def _start(self, command: str, config, described: list[dict], rewrite_config=False) -> None:
        if self.manifest_path.is_file():  # read first: a bad one is refused with nothing written
            self.manifest = read_manifest(self.manifest_path)
        else:
            self.manifest = {"command": command, "created": _now(), "attempts": [], "counts": {}}
        config_path = self.path / "config.yaml"
        if rewrite_config or not config_path.is_file():  # rewritten: a growable list changed
            atomic_write_text(config_path, dump_yaml(config))
        self.manifest["inputs"] = described
        self.manifest["versions"] = package_versions()
        self.manifest["attempts"].append(
            {"started": _now(), "argv": sys.argv[1:], "status": "running"}
        )
        self.manifest.setdefault("timings", {})
        self.save()
        self.logger = _file_logger(self.path / "logs" / "run.log")
        self.logger.info("run started: %s", command)

    def _release(self) -> None:
        if self._lock is not None:
            # Removed, so a finished run directory holds only what the run made.
            unlock(self._lock, remove=True)
            self._lock = None

    def save(self) -> None:
        if not self.writer:
            return
        # Redacted as written: argv and input specs may hold a key (`--set ...base_url=...`).
        text = json.dumps(redact_data(self.manifest), indent=2) + "\n"
        atomic_write_text(self.manifest_path, text)

    def count(self, **counts: int | float) -> None:
        self.manifest["counts"].update(counts)
        self.save()

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = round(time.perf_counter() - start, 3)
            self.manifest["timings"][stage] = self.manifest["timings"].get(stage, 0) + seconds
            self.save()
            self.logger.info("%s took %.1f s", stage, seconds)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Record how the attempt ended: completed, interrupted (Ctrl-C, SIGTERM) or failed."""
        try:
            if exc_type is None:
                self.finish("completed")
            elif issubclass(exc_type, KeyboardInterrupt | SystemExit):
                self.finish("interrupted")
            else:
                self.finish("failed")
                self.logger.error("failed: %s: %s", exc_type.__name__, exc)
        finally:
            self._release()

    def finish(self, status: str = "completed") -> None:
        self.manifest["attempts"][-1].update(status=status, finished=_now())
        self.save()
        self.logger.info("run %s", status)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _file_logger(path: Path) -> logging.Logger:
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"potstill.run.{path.parent.parent.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger


class _RedactingFormatter(logging.Formatter):
    """run.log's lines with credentials masked: an error a server echoed may hold its key."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _lock_run_dir(path: Path):
    """Create the run directory if need be and take its lock; a directory that cannot be
    written, or that another process holds, is refused in one line, with nothing written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return try_lock(path / LOCK)
    except LockHeld as held:
        pid = f" (pid {held.pid})" if held.pid else ""
        raise ConfigError(
            f"{path} is in use by another potstill process{pid}; wait for it or use another "
            "run.output_dir"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
            raise  # a full disk is the CLI's own one-line message
        raise ConfigError(
            f"run.output_dir {path}: cannot write there ({exc.strerror}); use a writable directory"
        ) from None
