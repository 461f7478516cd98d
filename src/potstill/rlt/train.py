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

import torch
from rich.console import Console

from potstill.rlt.config import RLTTrainConfig
from potstill.rlt.data import load_rlt_records
from potstill.rlt.grpo import GRPOHooks, Question, collate, make_loss_fn
from potstill.runs import RunDir
from potstill.train.sft import count_tokens


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


def run_rlt_train(cfg: RLTTrainConfig, console: Console | None = None, *, resume: bool = False):
    from potstill.models import apply_lora
    from potstill.train.loop import train
    from potstill.train.save import save_final

    console = console or Console(stderr=True)
    questions = load_questions(cfg)
    teacher, tokenizer, student, student_tok = load_pair(cfg)
    if cfg.teacher.lora:
        torch.manual_seed(cfg.train.seed)  # LoRA's initial weights
        teacher = apply_lora(teacher, cfg.teacher.lora)
        if cfg.train.gradient_checkpointing:
            teacher.enable_input_require_grads()
    g = cfg.grpo.group_size
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    console.print(
        f"[bold]{len(questions)}[/] questions × G={g}; {per_step} "
        f"question{'s' if per_step > 1 else ''} per step (and per process)"
    )
    inputs = [cfg.data.source]
    with RunDir(cfg.run.output_dir, command="rlt train", config=cfg, inputs=inputs) as run:
        from potstill.distributed import is_main_process

        hooks = GRPOHooks(
            policy=teacher, tokenizer=tokenizer, student=student, student_tokenizer=student_tok,
            grpo=cfg.grpo, reward=cfg.reward, tags=cfg.tags,
            teacher_system_prompt=cfg.teacher_system_prompt,
            student_system_prompt=cfg.student_system_prompt, seed=cfg.train.seed,
            reference_dir=run.path / "reference", is_main=is_main_process(),
        )  # fmt: skip
        run.count(questions=len(questions), group_size=g)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        with run.timed("train"):
            result = train(
                cfg=cfg.train,
                model=teacher,
                examples=questions,
                collate=lambda rollouts: collate(rollouts, pad),
                count_tokens=count_tokens,
                loss_fn=make_loss_fn(cfg.grpo),
                run=run,
                log_with=cfg.run.log_with,
                console=console,
                require_checkpoint=resume,
                hooks=hooks,
            )
        final = save_final(
            teacher, tokenizer, run.path / "final", merge=cfg.train.merge_lora,
            base_spec=cfg.teacher.name,
        )  # fmt: skip
        run.count(steps=result["step"], final_reward=result.get("reward_mean", float("nan")))
    console.print(f"[green]done[/] {result['step']} GRPO steps; teacher saved to {final}")
    return result
