"""`potstill rlt train`: GRPO on the teacher with the RLT reward (see `rlt.grpo`).

    potstill rlt train --config configs/rlt_train-cpu.yaml [--resume]

The teacher (the policy; LoRA or full) samples `grpo.group_size` explanations per question, the
frozen student scores them through the RLT reward, and the shared loop takes one step per
`train.grad_accum` micro-batches of `train.micro_batch_size` questions. Checkpoints, exact
resume, SIGTERM/Ctrl-C handling and TensorBoard (loss, pg_loss, kl, reward_mean, r_ss_mean,
r_kl_mean, closed, completion_tokens) come from the loop. `final/` is a model directory that
`rlt explain` and `rlt score` open.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console

from potstill.config.sections import LoraConfig, ModelConfig, RunConfig, TrainConfig
from potstill.distributed import is_main_process, world_size
from potstill.rlt.config import KIT_05B, GRPOConfig, RLTDataConfig
from potstill.rlt.data import load_rlt_records
from potstill.rlt.grpo import GRPOHooks, Question, collate, make_loss_fn
from potstill.rlt.prompts import RLTTags
from potstill.rlt.rewards import RewardConfig
from potstill.rlt.vllm_rollouts import VLLMRollouts
from potstill.train.fit import Fit, fit


@dataclass
class RLTTrainConfig:
    """GRPO on the teacher with the RLT reward for a fixed student."""

    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(name=KIT_05B, lora=LoraConfig())
    )
    """The policy: a model spec, or a warm-up's final/ directory."""
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name=KIT_05B))
    """The frozen student whose log-probs make the reward."""
    data: RLTDataConfig = field(default_factory=RLTDataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-5, grad_accum=2, warmup_ratio=0.0, save_every=5)
    )
    """micro_batch_size = questions per micro-batch (each sampled group_size times)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/rlt_train"))
    tags: RLTTags = field(default_factory=RLTTags)
    teacher_system_prompt: str | None = "rlt_teacher"
    student_system_prompt: str | None = "rlt_student"


def load_questions(cfg: RLTTrainConfig) -> list[Question]:
    data = cfg.data
    return [
        Question(str(r.get("id", i)), r[data.question_field], r[data.solution_field])
        for i, r in enumerate(load_rlt_records(data))
    ]


def load_pair(cfg: RLTTrainConfig):
    """(teacher, its tokenizer, student, its tokenizer), the vocabularies checked before the
    weights load; the student frozen in eval mode."""
    from potstill.models import check_same_vocab, load_model, load_tokenizer

    def tokenizer(model_cfg):
        return load_tokenizer(model_cfg.name, trust_remote_code=model_cfg.trust_remote_code)

    teacher_tok, student_tok = tokenizer(cfg.teacher), tokenizer(cfg.student)
    check_same_vocab(teacher_tok, student_tok)

    def model(model_cfg):
        return load_model(
            model_cfg.name, dtype=model_cfg.dtype, device=model_cfg.device,
            trust_remote_code=model_cfg.trust_remote_code,
        )  # fmt: skip

    teacher, student = model(cfg.teacher), model(cfg.student).eval()
    student.requires_grad_(False)
    return teacher, teacher_tok, student, student_tok


def check_vllm_rollouts() -> None:
    """vLLM rollouts need vLLM, and run one engine in one process (colocated)."""
    from potstill.errors import ConfigError
    from potstill.teacher.vllm_backend import import_vllm

    if world_size() > 1:
        raise ConfigError(
            "grpo.backend: vllm runs one colocated engine in a single training process; launch "
            "without accelerate's multi-process mode or set grpo.backend: hf"
        )
    import_vllm()


def run_rlt_train(cfg: RLTTrainConfig, console: Console | None = None, *, resume: bool = False):

    console = console or Console(stderr=True)
    questions = load_questions(cfg)
    if cfg.grpo.backend == "vllm":
        check_vllm_rollouts()  # before any weights load: a missing vLLM is one line, now
    teacher, tokenizer, student, student_tok = load_pair(cfg)
    g = cfg.grpo.group_size
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    console.print(
        f"[bold]{len(questions)}[/] questions × G={g}; {per_step} "
        f"question{'s' if per_step > 1 else ''} per step (and per process)"
    )

    engines = []

    def hooks(run, policy):  # the policy as trained: with its LoRA adapters, if any
        if cfg.grpo.backend == "vllm":
            engines.append(VLLMRollouts(
                cfg.teacher.name, cfg.grpo.vllm, dtype=cfg.teacher.dtype, seed=cfg.train.seed,
            ))  # fmt: skip
        return GRPOHooks(
            policy=policy, tokenizer=tokenizer, student=student, student_tokenizer=student_tok,
            grpo=cfg.grpo, reward=cfg.reward, tags=cfg.tags,
            teacher_system_prompt=cfg.teacher_system_prompt,
            student_system_prompt=cfg.student_system_prompt, seed=cfg.train.seed,
            reference_dir=run.path / "reference", is_main=is_main_process(),
            engine=engines[0] if engines else None,
        )  # fmt: skip

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    counts = {"questions": len(questions), "group_size": g}
    spec = Fit("rlt train", cfg, cfg.teacher, cfg.train, cfg.run, [cfg.data.source], counts)
    try:
        result, final = fit(
            teacher, tokenizer, questions, spec, collate=lambda rollouts: collate(rollouts, pad),
            loss_fn=make_loss_fn(cfg.grpo), console=console, resume=resume, hooks=hooks,
            final_metric="reward_mean",
        )  # fmt: skip
    finally:  # free the engine's GPU memory whether training ended or failed
        for engine in engines:
            engine.close()
    console.print(f"[green]done[/] {result['step']} GRPO steps; teacher saved to {final}")
    return result
