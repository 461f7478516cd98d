"""Run directories: resolved config, manifest (inputs with hashes, versions, counts, timings), logs.

Rerunning a command on the same directory resumes it: the manifest gains an attempt, shards are
kept. A directory made with a different config, or holding work done on inputs that have changed
since, is refused, since its shards would mix two jobs. One process writes a run directory at a
time (a lock), and what is stored there never holds a credential (`potstill.redact`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import yaml

from potstill.config import dump_yaml, to_dict
from potstill.errors import ConfigError
from potstill.fsutil import LockHeld, atomic_write_text, sha256_file, try_lock, unlock
from potstill.redact import redact, redact_data
from potstill.specs import mixture_parts

LOCK = ".run.lock"
"""The run directory's lock file: held by the process writing the directory (it holds that
process's pid), and removed when it is done; one killed leaves it, free, for the next."""
BOOKKEEPING = ("config.yaml", "manifest.json", "logs")
"""What RunDir itself keeps in a run directory, as opposed to the stage's work."""

TRACKED_PACKAGES = (
    "potstill",
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "trl",
    "datasets",
    "safetensors",
    "gguf",
    "reasoning-gym",
    "math-verify",
    "vllm",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def describe_input(spec: str) -> dict:
    """What an input was, precisely enough to tell if it changed."""
    parts = mixture_parts(spec)
    if len(parts) > 1:  # a mixture changed when one of its parts did
        described = [describe_input(part) for part in parts]
        joined = "\0".join(json.dumps(d, sort_keys=True) for d in described)
        return {"spec": spec, "sha256": hashlib.sha256(joined.encode()).hexdigest()}
    if spec.startswith("rg:"):
        return {
            "spec": spec,
            "generator": f"reasoning-gym=={package_versions().get('reasoning-gym')}",
        }
    path = Path(spec.partition("?")[0]).expanduser()
    if path.is_file():
        return {"spec": spec, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    if path.is_dir():
        h = hashlib.sha256()
        for file in _content_files(path):
            h.update(f"{file.relative_to(path)}\0{sha256_file(file)}\0".encode())
        return {"spec": spec, "sha256": h.hexdigest()}
    return {"spec": spec}


def _content_files(path: Path) -> list[Path]:
    """The files of an input directory that are its content: not hidden ones (locks, temp files)
    and, in a run directory (a teacher cache), not the manifest and logs every rerun appends to,
    or a distill resumed after a no-op rerun of its cache would see a changed input."""
    run_dir = all((path / name).exists() for name in BOOKKEEPING[:2])
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and not (run_dir and p.relative_to(path).parts[0] in BOOKKEEPING[1:])
    )


def _input_path(spec: str) -> Path | None:
    if spec.startswith("rg:"):
        return None
    path = Path(spec.partition("?")[0]).expanduser()
    return path if path.exists() else None


def _key_of(config, spec: str) -> str:
    """The config key that names input `spec` ("data.source", "tasks.0.source"), for messages."""

    def walk(value, prefix: str):
        if value == spec:
            yield prefix
        if isinstance(value, dict):
            pairs = value.items()
        elif isinstance(value, list):
            pairs = enumerate(value)
        else:
            return
        for key, item in pairs:
            yield from walk(item, f"{prefix}.{key}" if prefix else str(key))

    tree = to_dict(config) if dataclasses.is_dataclass(config) else config
    return next(walk(tree, ""), "input") or "input"


def check_output_dir(path: str | Path, config, inputs: list[str]) -> Path:
    """Refuse a `run.output_dir` that cannot be a run directory, before anything is written: an
    empty one (it would write into the current directory), an existing file, or one that is,
    holds or lies inside an input (outputs mixed into the input; the rerun reads them back)."""
    if not str(path).strip():
        raise ConfigError(
            "run.output_dir is empty, which would write into the current directory; name a "
            "directory for the run, e.g. --set run.output_dir=runs/my-run"
        )
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir {out} is a file, not a directory; name a directory")
    where = out.resolve()
    for spec in inputs:
        source = _input_path(spec)
        if source is None:
            continue
        source = source.resolve()
        if where == source or where.is_relative_to(source):
            how = "is" if where == source else "is inside"
        elif source.is_relative_to(where):
            how = "holds"
        else:
            continue
        raise ConfigError(
            f"run.output_dir {out} {how} the input {_key_of(config, spec)} {spec}: the outputs "
            "would mix with it; use a run.output_dir outside the input"
        )
    return out


def has_work(path: Path) -> bool:
    """Whether a run directory holds work a rerun would keep (samples, checkpoints, answers):
    any file but RunDir's own bookkeeping and hidden lock and temp files."""
    for root, dirs, files in os.walk(path):
        top = Path(root) == path
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (top and d == "logs")]
        if any(not f.startswith(".") and not (top and f in BOOKKEEPING) for f in files):
            return True
    return False


def check_same_inputs(path: str | Path, config, described: list[dict]) -> None:
    """Refuse to resume work done on an input that has changed since (a sample of the old
    question kept, training resumed on other data). A run directory without work takes the
    inputs as they are now."""
    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.is_file() or not has_work(path):
        return
    inputs = read_manifest(manifest).get("inputs", [])  # a malformed manifest: one line
    before = {entry.get("spec"): entry.get("sha256") for entry in inputs if isinstance(entry, dict)}
    for now in described:
        old = before.get(redact(now["spec"]))  # the manifest holds the specs redacted
        if old and now.get("sha256") and now["sha256"] != old:
            raise ConfigError(
                f"{_key_of(config, now['spec'])} {now['spec']} changed since this run started "
                f"(sha256 {old[:12]}… then, {now['sha256'][:12]}… now); rerun with a new "
                "run.output_dir, or restore the file"
            )


def _differences(a, b, prefix: str = "") -> list[str]:
    """Every changed key, as 'key (old before, new now)', in key order."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            found
            for key in sorted(set(a) | set(b), key=str)
            for found in _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        ]
    return [] if a == b else [f"{prefix.rstrip('.')} ({a!r} before, {b!r} now)"]


def _item_key(item) -> str:
    """What names an item of a growable list: its `name` or `label` field, or the item."""
    if isinstance(item, dict):
        return str(item.get("label") or item.get("name"))
    return str(item)


def _grown_differences(before: dict, now: dict, growable: tuple[str, ...]) -> list[str]:
    """Compare the growable top-level lists item by item, then drop them from both configs: an
    item may be added or left out, but one kept under the same name must not change."""
    diffs = []
    for key in growable:
        old_items = {_item_key(i): i for i in before.pop(key, None) or []}
        for item in now.pop(key, None) or []:
            name = _item_key(item)
            if name in old_items and old_items[name] != item:
                diffs += _differences(old_items[name], item, f"{key}[{name}].")
    return diffs


def check_same_config(path: str | Path, config, growable: tuple[str, ...] = ()) -> bool:
    """Refuse a run directory made with another config, naming every changed key. Cheap: a
    trainer calls it before loading models, so a changed `--resume` fails at once.

    `growable` names top-level lists whose items are each their own work (an eval's models and
    tasks, a compare's methods): a rerun may add items. Returns whether one of them changed, so
    that the stored config is rewritten."""
    config_path = Path(path) / "config.yaml"
    if not config_path.is_file():
        return False
    # config.yaml is stored redacted: compare it with the config redacted the same way.
    before, now = yaml.safe_load(config_path.read_text()), redact_data(to_dict(config))
    grown = isinstance(before, dict) and any(before.get(k) != now.get(k) for k in growable)
    if isinstance(before, dict) and growable:
        before, now = dict(before), dict(now)
        diffs = _grown_differences(before, now, growable) + _differences(before, now)
    else:
        diffs = _differences(before, now)
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise ConfigError(
            f"{path} holds a run with another config: {shown}; "
            "use a new output_dir, or delete the old run to start over"
        )
    return grown


def read_manifest(path: Path) -> dict:
    """A run's manifest, refused in one line when it is not what RunDir writes (a JSON object
    whose attempts are a list and whose counts and timings are objects)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    shapes = {"attempts": list, "counts": dict, "timings": dict}
    if isinstance(manifest, dict):
        for key, kind in shapes.items():
            manifest.setdefault(key, kind())
    if not isinstance(manifest, dict) or any(
        not isinstance(manifest[key], kind) for key, kind in shapes.items()
    ):
        raise ConfigError(
            f"{path}: not a manifest potstill wrote (it must be a JSON object with attempts, "
            "counts and timings); move it away to start its record afresh (outputs are kept)"
        )
    return manifest


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
