"""Dequantize a GGUF file once into a plain safetensors model directory.

A model loaded straight from GGUF carries a quantizer that makes transformers refuse to train or
save it; a plain directory trains, saves and reloads like any other Hugging Face model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from potstill.errors import ModelError
from potstill.fsutil import replace_dir

MARKER = "potstill-model.json"
"""Written last inside a converted directory: its presence means the conversion completed."""


def check_gguf(path: Path) -> None:
    """Raise ModelError unless `path` is a complete, readable GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        end = max(
            (int(t.data_offset) + int(t.n_bytes) for t in reader.tensors),
            default=0,
        )
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on bad files
        raise ModelError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "it is corrupt or truncated: download it again"
        ) from None
    size = path.stat().st_size
    if end > size:
        raise ModelError(
            f"{path}: truncated GGUF file ({size:,} bytes, its tensors need {end:,}); "
            "download it again"
        )


def convert_gguf(
    gguf_path: Path, out_dir: Path, *, dtype: torch.dtype = torch.bfloat16, meta: dict | None = None
) -> Path:
    """Convert `gguf_path` into `out_dir` (safetensors + tokenizer), atomically.

    bf16 halves the directory's size; logits stay within ~0.1 of the GGUF load with the same argmax.
    """
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    check_gguf(gguf_path)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
        plain.load_state_dict(quantized.state_dict(), strict=True)
        plain.generation_config = quantized.generation_config
        del quantized
        plain.save_pretrained(tmp)
        del plain
        save_gguf_tokenizer(gguf_path, tmp)
    except ModelError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(
            f"{gguf_path}: could not convert this GGUF ({type(exc).__name__}: {exc}); "
            "check it is a complete causal-LM GGUF of an architecture transformers supports"
        ) from None
    info = {"source": str(gguf_path), "dtype": str(dtype).removeprefix("torch."), **(meta or {})}
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    replace_dir(tmp, out_dir)
    return out_dir


def save_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Write the tokenizer a GGUF file carries (vocabulary, merges, chat template) to `out_dir`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)


def is_converted(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()
