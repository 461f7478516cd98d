"""potstill: knowledge distillation for language models.

    import potstill as ps

    ps.generate("configs/generate-gsm.yaml")          # every stage, as in the CLI (docs/api.md)
    model, tokenizer = ps.load_model("qwen2.5-coder-0.5b-instruct"), ps.load_tokenizer(...)
    ps.losses.jsd(student_logits, teacher_logits, beta=0.5)

Attributes load on first use, so `import potstill` stays fast (no torch until needed).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_STAGES = (
    "quickstart", "generate", "curate_samples", "sft", "distill", "teacher_cache", "evaluate",
    "compare", "rlt_score", "rlt_warmup", "rlt_train", "rlt_explain",
)  # fmt: skip
_FUNCTIONS = {
    "load_model": "potstill.models",
    "load_tokenizer": "potstill.models",
    "check_same_vocab": "potstill.models",
    "apply_lora": "potstill.models",
    "read_records": "potstill.data",
    "write_records": "potstill.data",
    "load_config": "potstill.config",
    "resolve_config": "potstill.api",
    "write_report": "potstill.report",
    "PotstillError": "potstill.errors",
    "ConfigError": "potstill.errors",
    "DataError": "potstill.errors",
    "ModelError": "potstill.errors",
}
_MODULES = ("losses", "data", "models", "config", "errors", "teacher", "train", "rlt")
# `eval` and `curate` the stages are `ps.evaluate` and `ps.curate_samples`: `ps.eval` and
# `ps.curate` are packages once one of their modules is imported.

__all__ = [*_STAGES, *_FUNCTIONS, *_MODULES]


def __getattr__(name: str):
    if name in _STAGES:
        from potstill.api import STAGES

        return STAGES[name]
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"potstill.{name}")
    raise AttributeError(f"module 'potstill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
