"""RLT rewards (Sakana AI, arXiv 2506.08388): how well an explanation teaches.

For a question q, solution s and the teacher's explanation t, with token log-probs taken at the
sampling temperature τ (logits / τ, then log_softmax):

    r^SS = mean_k log π_s(s_k | q, t) + α · min_k log π_s(s_k | q, t)   solution tokens, student
    D_k  = log π_θ(t_k | q, s, t_<k) − log π_s(t_k | q, t_<k)           explanation tokens
    r^KL = mean_k D_k + α · max_k D_k
    r    = r^SS − λ · r^KL      (or `missing_tag_reward` when the teacher never closed t, or t
                                 is empty)

r^SS rewards explanations after which the student finds the solution likely; r^KL penalises
explanations the student could not have thought of itself (tokens the teacher makes likely only
because it sees the solution). The two reductions of each term are configurable.

Tokens belong to a part when their character range overlaps it, so a token that BPE merged across
a tag boundary still counts. The explanation sits between different tags in the two contexts, so
its edge tokens can differ between them: the teacher's and the student's explanation tokens are
grouped so that each group covers the same characters, and a group's D is the log-ratio of the
group's joint probability. Where both tokenise alike (almost every token) a group is one token and
D_k is the plain sampled-token log-ratio.

`reward_batch` runs each model over the batch at once (rlt/logprobs.py: prefixes a group shares
run once, the vocabulary only at the positions the rewards read); `reward_per_sample` is the plain
reference (one full forward per sample and model) that tests and `benchmarks/rlt_reward.py`
compare it with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from potstill.config import check
from potstill.errors import ModelError
from potstill.models import check_same_vocab
from potstill.rlt.logprobs import gather_logprobs
from potstill.rlt.prompts import (
    RLTTags,
    Sample,
    Tokenised,
    split_explanation,
    system_prompt,
    tokenise,
)
from potstill.rlt.unclosed import explains, placeholder

Reduction = Literal["mean", "min", "max", "sum"]
REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": torch.mean,
    "min": torch.amin,
    "max": torch.amax,
    "sum": torch.sum,
}


@dataclass
class RewardConfig:
    alpha: float = 0.01
    """Weight of the second reduction in r^SS and r^KL (the paper's α)."""
    lam: float = 3.0
    """reward = r^SS − lam · r^KL (the paper's λ)."""
    temperature: float = 0.7
    """Sampling temperature: both models' logits are divided by it before log_softmax."""
    missing_tag_reward: float | None = None
    """Reward of an explanation the teacher never closed with the explanation_end tag, or left
    empty; null (default) = 1 below the lowest closed reward of its question's group, so it
    always ranks last (a fixed −1, the paper's, sits above a warmed-up teacher's closed rewards
    here and teaches it never to close; rlt/unclosed.py)."""
    solution_reductions: list[Reduction] = field(default_factory=lambda: ["mean", "min"])
    """r^SS = first(log-probs) + alpha · second(log-probs) over the solution tokens."""
    kl_reductions: list[Reduction] = field(default_factory=lambda: ["mean", "max"])
    """r^KL = first(D) + alpha · second(D) over the explanation tokens."""
    max_length: int | None = None
    """Longest context in tokens; default each model's max_position_embeddings. Longer samples
    are skipped with a reason."""
    share_prefix: bool = True
    """Run a prefix that rows share once per cluster of rows (a GRPO group shares its question
    and, for the teacher, the solution), its KV cache expanded over their suffixes."""
    logit_chunk: int = 256
    """Positions per lm_head + logsumexp block: bounds the (chunk, vocab) float32 memory."""

    def __post_init__(self):
        check(self.temperature > 0, f"temperature: must be > 0, got {self.temperature}")
        check(self.alpha >= 0, f"alpha: must be >= 0, got {self.alpha}")
        check(self.lam >= 0, f"lam: must be >= 0, got {self.lam}")
        for name in ("solution_reductions", "kl_reductions"):
            value = getattr(self, name)
            check(
                len(value) == 2 and all(r in REDUCTIONS for r in value),
                f"{name}: give two of {', '.join(REDUCTIONS)} (first + alpha · second), "
                f"got {value}",
            )
        check(
            self.max_length is None or self.max_length > 1,
            f"max_length: must be > 1, got {self.max_length}",
        )
        check(self.logit_chunk > 0, f"logit_chunk: must be > 0, got {self.logit_chunk}")


@dataclass
class RewardResult:
    rlt_reward: float | None
    r_ss: float | None
    r_kl: float | None
    solution_tokens: int
    explanation_tokens: int
    """Number of D_k terms (explanation tokens, edge tokens grouped when tokenised apart)."""
    closed: bool
    skipped: str | None = None
    """Why the sample was not scored (its context is longer than the model takes)."""


@dataclass
class RLTModels:
    """Teacher π_θ and student π_s with their tokenizers (one vocabulary) and the prompts."""

    teacher: Any
    teacher_tokenizer: Any
    student: Any
    student_tokenizer: Any
    tags: RLTTags = field(default_factory=RLTTags)
    teacher_system_prompt: str | None = "rlt_teacher"
    """Bundled prompt name or .txt path; null = no system message."""
    student_system_prompt: str | None = "rlt_student"
    teacher_system: str | None = field(init=False)
    student_system: str | None = field(init=False)

    def __post_init__(self):
        check_same_vocab(self.teacher_tokenizer, self.student_tokenizer)
        for tok in (self.teacher_tokenizer, self.student_tokenizer):
            if not tok.is_fast:
                raise ModelError(
                    f"{type(tok).__name__} is a slow tokenizer; RLT rewards need character "
                    "offsets: load the fast one (use_fast=True)"
                )
        self.teacher_system = system_prompt(self.teacher_system_prompt, self.tags)
        self.student_system = system_prompt(self.student_system_prompt, self.tags)


def combine(values: torch.Tensor, reductions: Sequence[str], alpha: float) -> float:
    """first(values) + alpha · second(values); values (K,), K ≥ 1."""
    first, second = (REDUCTIONS[r](values) for r in reductions)
    return float(first + alpha * second)


def solution_reward(student_logprobs: torch.Tensor, cfg: RewardConfig) -> float:
    """r^SS from the student's log-probs of the solution tokens, (K,)."""
    return combine(student_logprobs.double(), cfg.solution_reductions, cfg.alpha)


def kl_penalty(log_ratio: torch.Tensor, cfg: RewardConfig) -> float:
    """r^KL from D_k = log π_θ − log π_s over the explanation tokens, (K,); 0 when K = 0."""
    if log_ratio.numel() == 0:
        return 0.0
    return combine(log_ratio.double(), cfg.kl_reductions, cfg.alpha)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """log softmax(logits / τ)[target] in float32: logits (N, V), targets (N,) -> (N,)."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _limit(model, cfg: RewardConfig) -> int | None:
    return cfg.max_length or getattr(model.config, "max_position_embeddings", None)


def prepare(models: RLTModels, samples: Sequence[Sample], cfg: RewardConfig) -> list[Tokenised]:
    """Tokenise both contexts and mark the samples too long for either model."""
    out = tokenise(
        samples,
        models.teacher_tokenizer,
        models.student_tokenizer,
        tags=models.tags,
        teacher_system=models.teacher_system,
        student_system=models.student_system,
    )
    limits = {"teacher": _limit(models.teacher, cfg), "student": _limit(models.student, cfg)}
    for t in out:
        lengths = {"teacher": len(t.teacher_ids), "student": len(t.student_ids)}
        too_long = [
            f"context_too_long: {side} {n} tokens > {limits[side]}"
            for side, n in lengths.items()
            if limits[side] is not None and n > limits[side]
        ]
        t.skipped = "; ".join(too_long) or None
    return out


def _group_sum(values: torch.Tensor, groups: list[int], n: int) -> torch.Tensor:
    """Float64 sums of (K,) values into n groups: (n,)."""
    index = torch.tensor(groups, dtype=torch.long, device=values.device)
    return torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(
        0, index, values.double()
    )


def _finish(
    prep: Tokenised,
    teacher_expl: torch.Tensor,
    student_expl: torch.Tensor,
    student_sol: torch.Tensor,
    cfg: RewardConfig,
) -> RewardResult:
    """The reward from the gathered log-probs (each (K,), in the order of prep's positions)."""
    log_ratio = _group_sum(teacher_expl, prep.teacher_groups, prep.n_groups) - _group_sum(
        student_expl, prep.student_groups, prep.n_groups
    )
    r_ss = solution_reward(student_sol, cfg)
    r_kl = kl_penalty(log_ratio, cfg)
    closed = prep.sample.closed
    counts = explains(closed, prep.n_groups)  # an empty explanation counts as unclosed
    return RewardResult(
        rlt_reward=r_ss - cfg.lam * r_kl if counts else placeholder(cfg.missing_tag_reward),
        r_ss=r_ss,
        r_kl=r_kl,
        solution_tokens=len(prep.student_sol),
        explanation_tokens=prep.n_groups,
        closed=closed,
    )


def _skipped(prep: Tokenised) -> RewardResult:
    return RewardResult(None, None, None, 0, 0, prep.sample.closed, prep.skipped)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _split(flat: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(flat, list(sizes)))


@torch.inference_mode()
def reward_batch(
    models: RLTModels, samples: Sequence[Sample], cfg: RewardConfig | None = None
) -> list[RewardResult]:
    """RLT rewards of a batch, each model run over all of it at once (rlt/logprobs.py): shared
    prefixes once, the vocabulary only where the rewards read.

    Samples whose context is too long come back with `skipped` set and no values.
    """
    cfg = cfg or RewardConfig()
    preps = prepare(models, samples, cfg)
    live = [p for p in preps if p.skipped is None]
    results: dict[int, RewardResult] = {}
    if live:
        pad = models.teacher_tokenizer.pad_token_id
        pad = models.teacher_tokenizer.eos_token_id if pad is None else pad  # masked anyway
        gather = {"temperature": cfg.temperature, "chunk": cfg.logit_chunk,
                  "share_prefix": cfg.share_prefix}  # fmt: skip
        t_flat = gather_logprobs(
            models.teacher, [p.teacher_ids for p in live], [p.teacher_expl for p in live], pad,
            **gather,
        )  # fmt: skip
        s_flat = gather_logprobs(
            models.student,
            [p.student_ids for p in live],
            [p.student_expl + p.student_sol for p in live],
            pad,
            **gather,
        )
        t_parts = _split(t_flat, [len(p.teacher_expl) for p in live])
        s_parts = _split(s_flat, [len(p.student_expl) + len(p.student_sol) for p in live])
        for p, t_lp, s_lp in zip(live, t_parts, s_parts, strict=True):
            k = len(p.student_expl)
            results[id(p)] = _finish(p, t_lp, s_lp[:k].to(t_lp.device), s_lp[k:], cfg)
    return [results.get(id(p)) or _skipped(p) for p in preps]


@torch.no_grad()
def _full_logprobs(model, ids: Sequence[int], temperature: float) -> torch.Tensor:
    """log π(x_p | x_<p) for p = 1..T-1 from one plain forward: (T-1,), float32."""
    x = torch.tensor([list(ids)], device=_device(model))
    logits = model(input_ids=x, use_cache=False).logits[0, :-1]  # (T-1, V)
    return token_logprobs(logits, x[0, 1:], temperature)


@torch.no_grad()
def reward_per_sample(
    models: RLTModels, samples: Sequence[Sample], cfg: RewardConfig | None = None
) -> list[RewardResult]:
    """The plain reference: per sample, one full forward per model and a log_softmax over the
    whole sequence (as the reference implementation computes it). Same results as
    `reward_batch`, slower; kept for tests and the benchmark."""
    cfg = cfg or RewardConfig()
    results = []
    for p in prepare(models, samples, cfg):
        if p.skipped is not None:
            results.append(_skipped(p))
            continue
        t_lp = _full_logprobs(models.teacher, p.teacher_ids, cfg.temperature)
        s_lp = _full_logprobs(models.student, p.student_ids, cfg.temperature).to(t_lp.device)

        def at(lp: torch.Tensor, positions: list[int]) -> torch.Tensor:
            return lp[torch.tensor(positions, dtype=torch.long, device=lp.device) - 1]

        results.append(
            _finish(
                p, at(t_lp, p.teacher_expl), at(s_lp, p.student_expl), at(s_lp, p.student_sol), cfg
            )
        )
    return results


def make_rlt_reward(
    models: RLTModels, cfg: RewardConfig | None = None, batch_size: int = 8
) -> Callable[..., list[float | None]]:
    """A reward function in the shared signature `reward(completions, **columns)`, for GRPO:
    completions are the teacher's raw generations after the prefill; None = skipped."""
    cfg = cfg or RewardConfig()

    def rlt_reward(
        completions: Sequence[str], *, question: Sequence[str], solution: Sequence[str], **_
    ) -> list[float | None]:
        samples = [
            Sample(q, s, *split_explanation(c, models.tags), id=str(i))
            for i, (c, q, s) in enumerate(zip(completions, question, solution, strict=True))
        ]
        out: list[float | None] = []
        for start in range(0, len(samples), batch_size):
            out += [
                r.rlt_reward for r in reward_batch(models, samples[start : start + batch_size], cfg)
            ]
        return out

    return rlt_reward
