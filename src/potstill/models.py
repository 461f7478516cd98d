"""One way to load a model, for teacher and student alike.

A *spec* is any of:
- an offline kit name (`potstill models list`), prepared on first use;
- a local Hugging Face model directory;
- a `.gguf` file, dequantized once into a cached safetensors directory;
- a hub id such as `Qwen/Qwen2.5-0.5B-Instruct` (needs network or a local HF cache);
- an already loaded `PreTrainedModel`, returned as is (LoRA still applied if asked).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from potstill.config.sections import LoraConfig, ModelConfig
from potstill.errors import ModelError
from potstill.fsutil import file_lock, sha256_file
from potstill.kit.convert import check_gguf, convert_gguf, is_converted
from potstill.kit.prepare import prepare, prepare_tokenizer
from potstill.kit.registry import KIT, closest_kit_name
from potstill.paths import cache_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(spec: str | Path) -> str:
    """Turn a spec into something `from_pretrained` accepts: a local directory or a hub id."""
    text = str(spec)
    if text in KIT:
        return str(prepare(text))
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}; check the path")
        return str(_converted_gguf(path))
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"{path} is a file: give a model directory, a .gguf file or a kit name"
            )
        if (path / "adapter_config.json").is_file():
            return str(path)  # a LoRA adapter: load_model merges it into its base
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is not a Hugging Face model directory (no config.json); "
                "point at the folder save_pretrained wrote"
            )
        return str(path)
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1:
        raise ModelError(f"model directory not found: {path}; check the path")
    if "/" not in text:
        close = closest_kit_name(text)
        hint = f"did you mean '{close}'? " if close else ""
        raise ModelError(
            f"unknown model '{text}': {hint}it is not an offline kit model "
            "(`potstill models list`), a local directory, or a hub id (org/name)"
        )
    return text  # a hub id: from_pretrained resolves it from the cache or the network


def _converted_gguf(path: Path) -> Path:
    """The cached plain directory for a user's GGUF file, converted on first use."""
    stat = path.resolve().stat()
    target = _converted_gguf_for(path.resolve(), stat.st_size, stat.st_mtime_ns)
    if not is_converted(target):  # the cache folder was removed since: convert again
        _converted_gguf_for.cache_clear()
        target = _converted_gguf_for(path.resolve(), stat.st_size, stat.st_mtime_ns)
    return target


@functools.lru_cache(maxsize=16)
def _converted_gguf_for(path: Path, size: int, mtime_ns: int) -> Path:
    # Keyed on size and mtime so load_tokenizer + load_model hash a multi-GB file once, not twice.
    check_gguf(path)  # before hashing or locking: a bad file must leave no trace in the cache
    digest = sha256_file(path)
    target = cache_dir("converted") / f"{path.stem}-{digest[:16]}"
    if is_converted(target):
        return target
    with file_lock(cache_dir("locks") / f"{target.name}.lock"):
        if not is_converted(target):
            convert_gguf(path, target, meta={"sha256": digest})
    return target


def _from_pretrained(loader, source: str, **kwargs):
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own commands show progress; per-tensor bars are noise
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"could not load '{source}' ({first}); without network use a local directory, "
            "a .gguf file or an offline kit model (`potstill models list`)"
        ) from None
    except SafetensorError as exc:
        raise ModelError(
            f"'{source}': a weights file is corrupt or truncated ({_one_line(exc)}); "
            "download or save the model again"
        ) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(
                f"'{source}' needs custom code from its repository; review it, then set "
                "trust_remote_code: true in the model config"
            ) from None
        raise


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def load_tokenizer(spec: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer for `spec`, with a pad token set (eos if the model has none)."""
    from transformers import AutoTokenizer

    # A kit model's tokenizer alone, if its weights are not converted yet: checks that need only
    # the vocabulary (a teacher/student pair, a token count) stay cheap.
    source = str(prepare_tokenizer(str(spec))) if str(spec) in KIT else resolve_model_path(spec)
    tokenizer = _from_pretrained(AutoTokenizer, source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(spec: str | Path, *, trust_remote_code: bool = False):
    """The model's `config.json` as a transformers config, without touching its weights; None for
    a kit model whose tokenizer alone was extracted (its config lives in the GGUF until
    `potstill models prepare`) and for a LoRA adapter folder."""
    from transformers import AutoConfig

    # As load_tokenizer: a kit name must not start a multi-GB conversion just to be inspected.
    source = str(prepare_tokenizer(str(spec))) if str(spec) in KIT else resolve_model_path(spec)
    folder = Path(source)
    if folder.is_dir() and not (folder / "config.json").is_file():
        return None
    try:
        return _from_pretrained(AutoConfig, source, trust_remote_code=trust_remote_code)
    except ModelError:
        raise  # already one line that says what to do (ModelError is a ValueError too)
    except (ValueError, KeyError) as exc:  # an unknown model_type, a malformed field
        raise ModelError(
            f"'{source}': transformers cannot read its config.json ({_one_line(exc)}); "
            "upgrade transformers or check the file"
        ) from None


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """ "auto" is bf16 on a GPU that supports it, else float32 (CPU training wants fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype '{dtype}': use auto, {', '.join(DTYPES)}") from None


def resolve_device(device: str) -> str:
    """A device name; auto is the GPU if there is one (each process's own GPU when several
    processes are launched)."""
    if device == "auto":
        from potstill.distributed import auto_device

        return auto_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"device '{device}': not a device; use cpu, cuda, cuda:N, mps or auto")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ModelError(f"device '{device}' asked for, but no CUDA GPU is visible; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ModelError(
                f"device '{device}': only {count} CUDA GPU{'s' if count > 1 else ''} visible "
                f"(cuda:0 to cuda:{count - 1}); pick one of them, or auto"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device '{device}' asked for, but MPS is not available here; use cpu")
    return device


def load_model(
    spec,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    lora: LoraConfig | None = None,
    trust_remote_code: bool = False,
):
    """A causal LM from any spec (see the module docstring), on `device`, LoRA-wrapped if asked."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    device = resolve_device(device)
    if isinstance(spec, PreTrainedModel):
        model = spec
    elif (adapter := _adapter_dir(spec)) is not None:
        model = _load_adapter(
            adapter, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
    else:
        source = resolve_model_path(spec)
        _check_safetensors(source)
        model = _from_pretrained(
            AutoModelForCausalLM,
            source,
            dtype=resolve_dtype(dtype, device),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # pickle weights (.bin) can run code when loaded
        )
        model.to(device)
    if lora is not None:
        model = apply_lora(model, lora)
    return model


def load_configured(cfg: ModelConfig):
    """(model, tokenizer) as a config section asks: spec, dtype, device, trust_remote_code.
    LoRA is not applied here: trainers apply it after seeding, so its initial weights repeat."""
    tokenizer = load_tokenizer(cfg.name, trust_remote_code=cfg.trust_remote_code)
    return load_section_model(cfg), tokenizer


def load_section_model(cfg: ModelConfig):
    """The model alone, as a config section asks (for a stage that has its tokenizer already)."""
    return load_model(
        cfg.name, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code
    )


def _check_safetensors(source: str) -> None:
    path = Path(source)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")):
        raise ModelError(
            f"{path} holds only pickle weights (*.bin), which can run code when loaded; potstill "
            "loads safetensors only: re-save the model with save_pretrained where you trust it"
        )
    raise ModelError(
        f"{path} has no weights (no *.safetensors file): the download or save did not finish; "
        "download or save the model again"
    )


def _adapter_dir(spec) -> Path | None:
    path = Path(str(spec)).expanduser()
    return path if (path / "adapter_config.json").is_file() else None


def _load_adapter(path: Path, **kwargs):
    """A LoRA adapter directory (as `potstill sft` saves one): its base with the adapter merged."""
    import json

    from peft import PeftModel

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelError(
            f"{path}/adapter_config.json names no base model; set base_model_name_or_path"
        )
    model = PeftModel.from_pretrained(load_model(base, **kwargs), str(path))
    return model.merge_and_unload()


def apply_lora(model, lora: LoraConfig):
    """Wrap `model` with PEFT LoRA adapters (Hu et al. 2021); only the adapters train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    layers, target_modules = None, lora.target_modules
    if lora.top_layers is not None:
        total = model.config.num_hidden_layers
        if lora.top_layers > total:
            raise ModelError(
                f"lora.top_layers={lora.top_layers} but the model has {total} layers; "
                f"use at most {total}"
            )
        layers = list(range(total - lora.top_layers, total))
        if target_modules == "all-linear":  # peft takes layer indices only with module names
            target_modules = sorted(
                {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and ".layers." in name}
            )  # fmt: skip
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def check_same_vocab(teacher_tokenizer, student_tokenizer, *, show: int = 3) -> None:
    """Raise ModelError unless both tokenizers map every token to the same id.

    Logit distillation compares distributions id by id, and RLT scores the teacher's tokens under
    the student: both are meaningless across vocabularies.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    problems = []
    if len(t_vocab) != len(s_vocab):
        problems.append(f"teacher has {len(t_vocab):,} tokens, student {len(s_vocab):,}")
    t_by_id = {i: tok for tok, i in t_vocab.items()}
    s_by_id = {i: tok for tok, i in s_vocab.items()}
    differing = [i for i in sorted(set(t_by_id) | set(s_by_id)) if t_by_id.get(i) != s_by_id.get(i)]
    if differing:
        shown = ", ".join(
            f"id {i}: {t_by_id.get(i)!r} vs {s_by_id.get(i)!r}" for i in differing[:show]
        )
        problems.append(f"{len(differing):,} ids differ (first: {shown})")
    if teacher_tokenizer.eos_token != student_tokenizer.eos_token:
        problems.append(
            f"eos differs ({teacher_tokenizer.eos_token!r} vs {student_tokenizer.eos_token!r})"
        )
    if problems:
        raise ModelError(
            "teacher and student tokenizers differ: "
            + "; ".join(problems)
            + "; logit distillation and RLT need one vocabulary: pick models of one family"
        )
