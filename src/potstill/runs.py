"""Run directories: resolved config, manifest (inputs with hashes, versions, counts, timings), logs.

Rerunning a command on the same directory resumes it: the manifest gains an attempt, shards are
kept. A directory made with a different config is refused, since its shards would mix two jobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
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
from potstill.fsutil import atomic_write_text, sha256_file

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
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{file.relative_to(path)}\0{sha256_file(file)}\0".encode())
        return {"spec": spec, "sha256": h.hexdigest()}
    return {"spec": spec}


def _differences(a, b, prefix: str = "") -> list[str]:
    """Every changed key, as 'key (old before, new now)', in key order."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            found
            for key in sorted(set(a) | set(b), key=str)
            for found in _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        ]
    return [] if a == b else [f"{prefix.rstrip('.')} ({a!r} before, {b!r} now)"]


def check_same_config(path: str | Path, config) -> None:
    """Refuse a run directory made with another config, naming every changed key. Cheap: a
    trainer calls it before loading models, so a changed `--resume` fails at once."""
    config_path = Path(path) / "config.yaml"
    if not config_path.is_file():
        return
    diffs = _differences(yaml.safe_load(config_path.read_text()), to_dict(config))
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise ConfigError(
            f"{path} holds a run with another config: {shown}; "
            "use a new output_dir, or delete the old run to start over"
        )


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

    Under a multi-process launch only the main process writes them; the others get the same
    object with writing switched off (and a logger that drops its lines)."""

    def __init__(self, path: str | Path, *, command: str, config, inputs: list[str] = ()):
        from potstill.distributed import is_main_process

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.path / "manifest.json"
        check_same_config(self.path, config)
        self.writer = is_main_process()
        if not self.writer:
            self.manifest = {"command": command, "attempts": [{}], "counts": {}, "timings": {}}
            self.logger = logging.getLogger("potstill.run.follower")
            self.logger.disabled = True
            return
        if self.manifest_path.is_file():  # read first: a bad one is refused with nothing written
            self.manifest = read_manifest(self.manifest_path)
        else:
            self.manifest = {"command": command, "created": _now(), "attempts": [], "counts": {}}
        config_path = self.path / "config.yaml"
        if not config_path.is_file():
            atomic_write_text(config_path, dump_yaml(config))
        self.manifest["inputs"] = [describe_input(s) for s in inputs]
        self.manifest["versions"] = package_versions()
        self.manifest["attempts"].append(
            {"started": _now(), "argv": sys.argv[1:], "status": "running"}
        )
        self.manifest.setdefault("timings", {})
        self.save()
        self.logger = _file_logger(self.path / "logs" / "run.log")
        self.logger.info("run started: %s", command)

    def save(self) -> None:
        if not self.writer:
            return
        atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=2) + "\n")

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
        if exc_type is None:
            self.finish("completed")
        elif issubclass(exc_type, KeyboardInterrupt | SystemExit):
            self.finish("interrupted")
        else:
            self.finish("failed")
            self.logger.error("failed: %s: %s", exc_type.__name__, exc)

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
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger
