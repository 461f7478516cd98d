"""GRPO (Shao et al. 2024, "DeepSeekMath") for the RLT teacher, as hooks on the shared loop.

A micro-batch is a few questions. Before its forward, `GRPOHooks.rollout` samples G explanations
per question from the live policy, scores them with the RLT reward (the policy itself is the
teacher π_θ in r^KL, at the weights that sampled them), turns each group's rewards into
advantages (r − mean) / (std + 1e-4), and takes the reference model's log-probs of the sampled
tokens. `grpo_loss` is then, per completion token,

    −A · π(t)/π_old(t)  +  β · (π_ref(t)/π(t) − log(π_ref(t)/π(t)) − 1)

summed over the window's completion tokens and divided by their number. One gradient step is
taken per rollout, so π_old is π itself (the ratio is 1 with gradient ∇ log π, as in TRL with
num_iterations = 1) and PPO's clipping never binds; it is left out.

Why our own loop and not TRL's GRPOTrainer: the RLT reward needs the policy's *own* log-probs of
the explanation in its teacher context (prompt + solution prefill), at the weights that sampled
it, next to a second (student) model's; TRL hands a reward function only the completions' text,
so the teacher forward would have to be redone outside the trainer on a copy of the weights. Here
the reward runs on the live policy in eval mode, batched, and the rest is the shared loop
(checkpoints, exact resume, accelerate, TensorBoard).

Sampling seeds are pure functions of (seed, micro-batch, row), and the reference weights are
saved at every re-sync, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from potstill.data.chat import stop_token_id
from potstill.data.seeds import rollout_seed
from potstill.losses.reduce import IGNORE_INDEX
from potstill.rlt.config import GRPOConfig
from potstill.rlt.prompts import RLTTags, Sample, system_prompt, teacher_request
from potstill.rlt.rewards import RewardConfig, RLTModels, reward_batch
from potstill.rlt.unclosed import rank_unclosed_last
from potstill.teacher.backends import Sampling
from potstill.teacher.hf_backend import HFBackend, render_prompt
from potstill.train.loop import StepHooks

ADVANTAGE_EPS = 1e-4


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    solution: str


@dataclass
class Rollout:
    """One sampled explanation, ready for the loss."""

    input_ids: list[int]
    """Prompt (with the solution prefill) + the sampled tokens."""
    labels: list[int]
    """IGNORE_INDEX on the prompt; the token itself on the sampled tokens."""
    advantage: float
    ref_logprobs: list[float]
    """log π_ref of each position's token (0 on the prompt), aligned with `labels`."""


def group_advantages(rewards: list[float | None]) -> list[float]:
    """(r − mean) / (std + 1e-4) over a group's scored rewards (std with Bessel's correction, as
    TRL); a sample without a reward (skipped as too long) gets 0: it neither pushes nor pulls."""
    scored = [r for r in rewards if r is not None]
    if len(scored) < 2:
        return [0.0] * len(rewards)
    mean, std = statistics.fmean(scored), statistics.stdev(scored)
    return [0.0 if r is None else (r - mean) / (std + ADVANTAGE_EPS) for r in rewards]


def grpo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    window_tokens: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a micro-batch (a pure function).

    logprobs, ref_logprobs, mask: (B, K) over the completion positions; advantages: (B,).
    Returns the sum of per-token losses / `window_tokens` and its parts (same normalisation).
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - logprobs.detach())
    policy = -ratio * advantages[:, None]
    parts = {"pg_loss": float((policy.detach() * mask).sum() / window_tokens)}
    per_token = policy
    if beta > 0 and ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + beta * kl
        parts["kl"] = float((kl.detach() * mask).sum() / window_tokens)
    return (per_token * mask).sum() / window_tokens, parts


def completion_logprobs(model, batch: dict[str, torch.Tensor], temperature: float):
    """log π(token) at temperature τ for the labelled positions: ((B, K) log-probs, (B, K) mask,
    (K,) column index into labels[:, 1:]). Logits are made only for columns some row needs."""
    labels = batch["labels"][:, 1:]
    keep = (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=keep,
        use_cache=False,
    ).logits
    targets = labels[:, keep]
    mask = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked, mask, keep


def collate(rollouts: list[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rollouts)

    def padded(rows, fill, dtype=None):
        return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=dtype)

    return {
        "input_ids": padded([r.input_ids for r in rollouts], pad_id),
        "attention_mask": padded([[1] * len(r.input_ids) for r in rollouts], 0),
        "labels": padded([r.labels for r in rollouts], IGNORE_INDEX),
        "ref_logprobs": padded([r.ref_logprobs for r in rollouts], 0.0, torch.float32),
        "advantages": torch.tensor([r.advantage for r in rollouts], dtype=torch.float32),
    }


def make_loss_fn(cfg: GRPOConfig):
    def loss_fn(model, batch, window_tokens):
        logprobs, mask, keep = completion_logprobs(model, batch, cfg.temperature)
        ref = batch["ref_logprobs"][:, 1:][:, keep] if cfg.beta > 0 else None
        return grpo_loss(logprobs, ref, batch["advantages"], mask, cfg.beta, window_tokens)

    return loss_fn


class ReferenceWeights:
    """The KL anchor: a copy of the trainable parameters (LoRA adapters, or every weight in full
    fine-tuning), swapped into the policy for the reference forward and swapped back after."""

    def __init__(self, model):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.saved = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def sync(self) -> None:
        for name, p in self.params.items():
            self.saved[name].copy_(p)

    @contextlib.contextmanager
    def active(self):
        current = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.saved[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(current[name])

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from potstill.fsutil import atomic_write_bytes

        tmp = path.with_name(f".{path.name}.tmp")
        save_file({n: t.contiguous().cpu() for n, t in self.saved.items()}, str(tmp))
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink()

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        for name, tensor in load_file(str(path)).items():
            self.saved[name].copy_(tensor)


class GRPOHooks(StepHooks):
    """Rollouts, rewards and advantages for the shared loop, and the reward curves it logs."""

    def __init__(
        self, *, policy, tokenizer, student, student_tokenizer, grpo: GRPOConfig,
        reward: RewardConfig, tags: RLTTags, teacher_system_prompt, student_system_prompt,
        seed: int, reference_dir: Path, is_main: bool = True, engine=None,
    ):  # fmt: skip
        self.policy, self.tokenizer, self.cfg, self.reward_cfg = policy, tokenizer, grpo, reward
        self.tags, self.seed, self.reference_dir, self.is_main = tags, seed, reference_dir, is_main
        self.models = RLTModels(
            policy, tokenizer, student, student_tokenizer, tags,
            teacher_system_prompt, student_system_prompt,
        )  # fmt: skip
        self.system = system_prompt(teacher_system_prompt, tags)
        self.reference = ReferenceWeights(policy) if grpo.beta > 0 else None
        self.ref_step = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._stats: dict[str, list[float]] = {}
        # A vLLM engine (`rlt.vllm_rollouts`) or None for hf; `version` counts the policy's
        # optimizer steps in this process, so the engine is synced once per changed policy.
        self.engine, self.version = engine, 0

    def rollout(self, model, micro_batch: int, items: list[Question]) -> list[Rollout]:
        g = self.cfg.group_size
        requests = [
            teacher_request(
                f"{q.id}#{k}", q.question, q.solution, tags=self.tags, system=self.system,
                seed=rollout_seed(self.seed, micro_batch, i * g + k),
            )
            for i, q in enumerate(items)
            for k in range(g)
        ]  # fmt: skip
        sampling = Sampling(
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            stop=(self.tags.explanation_end,),
        )
        was_training = model.training
        model.eval()
        try:
            out = self._generate(model, requests, sampling)
            samples = [self._sample(items[j // g], out[r.key]) for j, r in enumerate(requests)]
            rewards = []
            for start in range(0, len(samples), self.cfg.reward_batch_size):
                chunk = samples[start : start + self.cfg.reward_batch_size]
                rewards += reward_batch(self.models, chunk, self.reward_cfg)
            rewards = rank_unclosed_last(
                rewards, [j // g for j in range(len(samples))], self.reward_cfg.missing_tag_reward
            )
            rollouts, flat = [], 0
            for i in range(len(items)):
                group = rewards[i * g : (i + 1) * g]
                advantages = group_advantages([r.rlt_reward for r in group])
                flat += all(a == 0.0 for a in advantages)
                for k, adv in enumerate(advantages):
                    request = requests[i * g + k]
                    rollouts.append(self._rollout(request, out[request.key], adv))
            self._reference_logprobs(model, rollouts)
        finally:
            model.train(was_training)
        self._record(rewards, [out[r.key] for r in requests])
        # Groups whose rewards are all equal push nothing: the share says how much of a step
        # had a learning signal (a near-deterministic teacher samples G identical texts).
        self._stats.setdefault("flat_groups", []).extend([1.0] * flat + [0.0] * (len(items) - flat))
        return rollouts

    def _generate(self, model, requests, sampling) -> dict:
        if self.engine is None:
            backend = HFBackend(model, self.tokenizer, batch_size=len(requests))
            return {r.key: gen for r, gen in backend.generate(requests, sampling)}
        self.engine.sync(model, self.version)
        return self.engine.generate(requests, sampling)

    def _sample(self, q: Question, generation) -> Sample:
        closed = self.tags.explanation_end in self.tokenizer.decode(generation.token_ids or [])
        return Sample(q.question, q.solution, generation.text, closed, q.id)

    def _rollout(self, request, generation, advantage: float) -> Rollout:
        prompt = self.tokenizer(render_prompt(self.tokenizer, request), add_special_tokens=False)
        prompt_ids, sampled = prompt["input_ids"], list(generation.token_ids or [])
        if generation.finish_reason == "stop" and self.tags.explanation_end not in (
            self.tokenizer.decode(sampled)
        ):
            # It chose to end: that is an action too, the token the backend stopped on.
            sampled.append(stop_token_id(self.tokenizer))
        return Rollout(
            input_ids=prompt_ids + sampled,
            labels=[IGNORE_INDEX] * len(prompt_ids) + sampled,
            advantage=advantage,
            ref_logprobs=[0.0] * (len(prompt_ids) + len(sampled)),
        )

    @torch.no_grad()
    def _reference_logprobs(self, model, rollouts: list[Rollout]) -> None:
        if self.reference is None:
            return
        batch = {k: v.to(model.device) for k, v in collate(rollouts, self.pad_id).items()}
        with self.reference.active():
            logprobs, mask, keep = completion_logprobs(model, batch, self.cfg.temperature)
        for row, rollout in enumerate(rollouts):
            for j, column in enumerate(keep.tolist()):
                if mask[row, j]:
                    rollout.ref_logprobs[column + 1] = float(logprobs[row, j])

    def _record(self, rewards, generations) -> None:
        scored = [r for r in rewards if r.rlt_reward is not None]
        add = self._stats.setdefault
        for r in scored:
            add("reward", []).append(r.rlt_reward)
            if r.closed:
                add("r_ss", []).append(r.r_ss)
                add("r_kl", []).append(r.r_kl)
        add("closed", []).extend(float(r.closed) for r in rewards)
        add("completion_tokens", []).extend(float(g.completion_tokens) for g in generations)
        add("skipped", []).extend(float(r.rlt_reward is None) for r in rewards)

    def after_step(self, step: int, logged: dict[str, float]) -> None:
        self.version += 1  # the policy moved: the next rollout syncs the engine first
        stats, self._stats = self._stats, {}
        for key, values in stats.items():
            if values:
                logged[f"{key}_mean" if key in ("reward", "r_ss", "r_kl") else key] = (
                    statistics.fmean(values)
                )
        if len(stats.get("reward", [])) > 1:
            logged["reward_std"] = statistics.stdev(stats["reward"])
        every = self.cfg.ref_sync_every
        if self.reference is not None and every and step % every == 0:
            self.reference.sync()
            self.ref_step = step
            if self.is_main:
                self.reference_dir.mkdir(parents=True, exist_ok=True)
                self.reference.save(self.reference_dir / f"step-{step:08d}.safetensors")

    def state_dict(self) -> dict:
        return {"ref_step": self.ref_step}

    def load_state_dict(self, state: dict) -> None:
        self.ref_step = int(state.get("ref_step", 0))
        if self.reference is not None and self.ref_step > 0:
            self.reference.load(self.reference_dir / f"step-{self.ref_step:08d}.safetensors")
