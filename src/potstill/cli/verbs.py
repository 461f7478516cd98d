"""The one table of stage verbs: typer registration, `potstill config show/check` and the
shipped-YAML test all read `VERBS`.

A row names the stage's config class and its `run_<verb>` function by import path, so the CLI
imports a stage (and torch) only when that verb runs. Adding a verb is one module in
`potstill/stages/` (its Config + run function) and one row here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from potstill.errors import ConfigError


@dataclass(frozen=True)
class Verb:
    key: str
    """Name in `config show KEY` and in recipe file names (configs/KEY-*.yaml)."""
    command: tuple[str, ...]
    """The command line words: ("sft",) or ("rlt", "train")."""
    config: str
    """module:Class of the stage's config."""
    run: str
    """module:function, called as run(cfg, console, **options)."""
    help: str
    options: tuple[str, ...] = ()
    """Extra CLI options the run function takes: resume, shard (with --merge)."""

    def config_class(self) -> type:
        return _resolve(self.config)

    def run_function(self):
        return _resolve(self.run)


def _resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _verb(key, command, module, config, run, help, *options) -> Verb:
    stage = f"potstill.stages.{module}"
    return Verb(key, command, f"{stage}:{config}", f"{stage}:{run}", help, options)


VERBS: dict[str, Verb] = {
    v.key: v
    for v in (
        _verb(
            "quickstart", ("quickstart",), "quickstart", "QuickstartConfig", "run_quickstart",
            "The main job, offline on CPU: baseline eval, teacher traces, curation, student "
            "fine-tuning, eval again, HTML report.",
        ),
        _verb(
            "generate", ("generate",), "generate", "GenerateConfig", "run_generate",
            "Teacher generation: N samples per record (hf, vllm or an OpenAI-compatible "
            "endpoint).",
            "shard",
        ),
        _verb(
            "curate", ("curate",), "curate", "CurateConfig", "run_curate",
            "Verify, filter, deduplicate and select teacher samples; prints the funnel.",
        ),
        _verb(
            "sft", ("sft",), "sft", "SFTConfig", "run_sft",
            "Fine-tune a student on records (loss on the target only); reruns resume "
            "automatically.",
            "resume",
        ),
        _verb(
            "distill", ("distill",), "distill", "DistillConfig", "run_distill",
            "Logit distillation (teacher online, from an offline cache, or on-policy); reruns "
            "resume.",
            "resume",
        ),
        _verb(
            "teacher_cache", ("teacher", "cache"), "teacher_cache", "TeacherCacheConfig",
            "run_teacher_cache",
            "Cache the teacher's top-k log-probs per target token (offline logit KD); reruns "
            "resume.",
        ),
        _verb(
            "eval", ("eval",), "eval", "EvalConfig", "run_eval",
            "Accuracy (pass@k, maj@k) of models on held-out tasks with real verifiers, and "
            "their cost.",
            "shard",
        ),
        _verb(
            "compare", ("compare",), "compare", "CompareConfig", "run_compare",
            "Train one student per distillation method (sft, logit, on_policy, "
            "sft_then_on_policy) at the same step budget; evaluate all on held-out sets that "
            "test transfer; one table with standard errors.",
        ),
        _verb(
            "rlt_score", ("rlt", "score"), "rlt_score", "RLTScoreConfig", "run_score",
            "Score explanations with the RLT reward (r^SS - lambda r^KL) for a student.",
        ),
        _verb(
            "rlt_warmup", ("rlt", "warmup"), "rlt_warmup", "RLTWarmupConfig", "run_warmup",
            "Supervised warm-up of the teacher in its format (loss on the explanation only).",
            "resume",
        ),
        _verb(
            "rlt_train", ("rlt", "train"), "rlt_train", "RLTTrainConfig", "run_rlt_train",
            "GRPO on the teacher with the RLT reward for a student; reruns resume.",
            "resume",
        ),
        _verb(
            "rlt_explain", ("rlt", "explain"), "rlt_explain", "RLTExplainConfig", "run_explain",
            "The teacher explains (question, solution) records, N each; --select best keeps "
            "the one that teaches the student best. Output: student training data; reruns "
            "resume.",
        ),
    )
}  # fmt: skip


def get_verb(key: str) -> Verb:
    if key not in VERBS:
        raise ConfigError(f"no config for stage '{key}'; stages: {', '.join(VERBS)}")
    return VERBS[key]


def stage_configs() -> dict[str, type]:
    """Every stage's config class by stage key (imports every stage)."""
    return {key: verb.config_class() for key, verb in VERBS.items()}
