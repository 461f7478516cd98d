"""What a run directory is checked against before it is written or resumed: its inputs'
fingerprints (files, directories, mixtures, generators), the config it was made with (naming
every changed key), where it lies relative to its inputs, and its manifest's shape. All cheap
and read-only, so every process of a launch makes them and refuses together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import yaml

from potstill.config import to_dict
from potstill.errors import ConfigError
from potstill.fsutil import sha256_file
from potstill.redact import redact, redact_data
from potstill.specs import mixture_parts

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


def field_defaults(cls) -> dict:
    """{field: default, as to_dict gives it} of a config dataclass, nested sections included;
    fields without a default are left out."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def _differences(a, b, prefix: str = "", defaults=None) -> list[str]:
    """Every changed key, as 'key (old before, new now)', in key order. A key the old config
    lacks (a field added since the run began) is unchanged when it is now at its default in
    `defaults`: the run was made with that behaviour."""
    if isinstance(a, dict) and isinstance(b, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        return [
            found
            for key in sorted(set(a) | set(b), key=str)
            if key in a or key not in defaults or b[key] != defaults[key]
            for found in _differences(a.get(key), b.get(key), f"{prefix}{key}.", defaults.get(key))
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
    defaults = field_defaults(type(config)) if dataclasses.is_dataclass(config) else None
    if isinstance(before, dict) and growable:
        before, now = dict(before), dict(now)
        diffs = _grown_differences(before, now, growable) + _differences(before, now, "", defaults)
    else:
        diffs = _differences(before, now, "", defaults)
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
