"""Save the trained model as a Hugging Face directory, atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

from potstill.fsutil import replace_dir


def save_final(model, tokenizer, path: Path, *, merge: bool, base_spec: str | None = None) -> Path:
    """A model directory `load_model` opens: full weights, or a LoRA adapter (merged on request).

    An adapter directory names its base by the spec it was trained from (a kit name, a directory,
    a hub id), so it stays loadable on another machine with the same kit. Under a multi-process
    launch the main process writes it and the others wait until it is there."""
    from potstill.distributed import barrier, is_main_process

    if not is_main_process():
        barrier()
        return path
    _save(getattr(model, "module", model), tokenizer, path, merge=merge, base_spec=base_spec)
    barrier()
    return path


def _save(model, tokenizer, path: Path, *, merge: bool, base_spec: str | None) -> None:
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge:
        model = model.merge_and_unload()
        is_peft = False
    if is_peft and base_spec:
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_spec
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings(), _hub_offline():
        # PEFT looks for the base's config under the spec to check the vocabulary (on the Hub, if
        # it can); a kit name is not a path, and the vocabulary is unchanged by LoRA, so the
        # lookup and its warning say nothing here. Saving never needs the network.
        warnings.filterwarnings("ignore", message="Could not find a config file")
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, path)


@contextlib.contextmanager
def _hub_offline():
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before
