"""The `potstill distill` config: student, teacher (online, offline cache, on-policy), loss, data.

Each field's help is the docstring under it (`potstill config show distill`).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Literal

from potstill.config import check, shown
from potstill.config.sections import MIN_TEMPERATURE, ModelConfig, SamplingConfig, check_given


@dataclass
class OnPolicyConfig(SamplingConfig):
    lmbda: float = 0.5
    """GKD's λ: the fraction of micro-batches whose target is replaced by the student's own
    sample of the prompt (scored by the online teacher). Drawn per micro-batch from the seed."""
    temperature: float = 1.0
    """Sampling temperature of the student's samples (0 = greedy)."""
    max_new_tokens: int = 128
    """Longest student sample."""

    def __post_init__(self):
        super().__post_init__()
        check(0.0 <= self.lmbda <= 1.0, f"lmbda: must be in [0, 1], got {self.lmbda}")


@dataclass
class DistillTeacherConfig:
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(name="qwen2.5-coder-1.5b-instruct")
    )
    """The teacher (same vocabulary as the student unless loss.cross_tokenizer). Offline, only
    its name is checked against the cache's (and, across vocabularies, its tokenizer loaded);
    online it runs in inference mode, bf16 where the GPU has it (dtype: auto)."""
    mode: Literal["online", "offline", "on_policy"] = "online"
    """online: the teacher runs beside the student; offline: top-k log-probs from a cache
    (`potstill teacher cache`); on_policy: online, plus GKD's student samples (see on_policy)."""
    cache: str | None = None
    """Offline mode: the cache directory `potstill teacher cache` wrote."""
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """Settings of on_policy mode."""
    storage_dtype: Literal["bfloat16", "float16"] | None = None
    """Keep the online teacher's linear weights in this dtype and compute in model.dtype (fp32
    on CPU): about half the teacher's memory, with fp32 arithmetic, for a CPU without fast bf16
    math (where `potstill doctor` does not suggest dtype: bfloat16). The lm_head stays in
    model.dtype."""

    def __post_init__(self):
        check_given(self.cache, "cache", "the directory `potstill teacher cache` wrote, or null")
        if self.storage_dtype is not None:
            check(
                self.model.dtype in ("auto", "float32"),
                f"storage_dtype: {self.storage_dtype} storage computes in model.dtype, which is "
                f"{self.model.dtype} already; set teacher.model.dtype=float32, or drop "
                "teacher.storage_dtype",
            )
            check(
                self.mode != "offline",
                "storage_dtype: mode offline loads no teacher; drop teacher.storage_dtype",
            )
        check(
            self.mode != "offline" or bool(self.cache),
            "mode: offline needs teacher.cache (the directory `potstill teacher cache` wrote)",
        )


@dataclass
class KDRatioConfig:
    strategy: Literal["fixed", "schedule", "teacher_confidence", "balance"] = "fixed"
    """How α (the soft loss's weight) is chosen; see docs/losses.md. fixed: `value`;
    schedule: start -> end over training; teacher_confidence: per token from the teacher;
    balance: keeps the soft term's share of the loss at `share`."""
    value: float = 0.5
    """fixed: α."""
    start: float = 0.0
    """schedule: α at step 0."""
    end: float = 1.0
    """schedule: α at the last step."""
    shape: Literal["linear", "cosine"] = "linear"
    """schedule: the curve between start and end."""
    confidence: Literal["gold", "entropy"] = "gold"
    """teacher_confidence: gold = the teacher's probability of the gold token; entropy = 1 - its
    normalised entropy."""
    floor: float = 0.0
    """teacher_confidence: lowest α."""
    ceil: float = 1.0
    """teacher_confidence: highest α."""
    share: float = 0.5
    """balance: the soft term's share of the loss."""
    momentum: float = 0.9
    """balance: EMA momentum of the two terms' magnitudes."""

    def __post_init__(self):
        for name in ("value", "start", "end", "floor", "ceil", "share", "momentum"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"{name}: must be in [0, 1], got {value}")
        check(self.floor <= self.ceil, f"floor ({self.floor}) must not exceed ceil ({self.ceil})")


@dataclass
class CrossTokenizerConfig:
    loss: Literal["uld", "hybrid"] = "hybrid"
    """uld: sorted probabilities compared, token identities ignored (any two vocabularies);
    hybrid: tokens spelled alike in both vocabularies compared by loss.divergence, the rest by
    ULD (vocabularies of one style, e.g. two byte-level BPEs). docs/cross_tokenizer.md."""
    top_k: int | None = None
    """ULD compares only the k largest probabilities of each side (null: the full sort)."""
    matched_weight: float = 1.0
    """hybrid: weight of the divergence on the tokens both vocabularies spell alike."""
    unmatched_weight: float = 1.0
    """hybrid: weight of ULD on the rest of the mass."""

    def __post_init__(self):
        check(
            self.top_k is None or self.top_k >= 1,
            f"top_k: must be a positive integer or null (the full sort), got {self.top_k}",
        )
        for name in ("matched_weight", "unmatched_weight"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, f"{name}: must be >= 0, got {value}")
        check(
            self.loss != "hybrid" or self.matched_weight + self.unmatched_weight > 0,
            "matched_weight and unmatched_weight are both 0: the soft loss would be 0; raise one",
        )


@dataclass
class KDLossConfig:
    divergence: str = "forward_kl"
    """Soft loss between teacher p and student q: forward_kl, reverse_kl, jsd, skew_forward_kl,
    skew_reverse_kl, tvd, or any divergence registered in potstill.losses (docs/losses.md has
    each formula and how to add one)."""
    beta: float = 0.5
    """jsd only: the mixture weight β of m = β p + (1 - β) q."""
    skew: float = 0.1
    """skew_forward_kl / skew_reverse_kl only: the skew α."""
    params: dict[str, float] = field(default_factory=dict)
    """Parameters of the divergence by its registry names, for divergences beyond beta and skew
    (e.g. {gamma: 0.3}); a name given here wins over beta/skew."""
    temperature: float = 1.0
    """Softmax temperature of both distributions; the soft loss is scaled by T². Offline, the
    cache's log-probs are used as cached: make it at this temperature."""
    kd_ratio: KDRatioConfig = field(default_factory=KDRatioConfig)
    """α of loss = (1 - α) CE + α T² soft."""
    tail: Literal["bucket", "renormalise"] = "bucket"
    """Offline top-k teacher: the mass outside the k tokens as one bucket, or renormalised away."""
    chunk_size: int | None = None
    """Tokens per lm_head chunk of the fused loss (default: as many as keep one chunk's float32
    buffers within 1 GiB, `potstill.losses.chunk_rows`: 640 at V = 32k, 128 at V = 152k; across
    tokenizers `losses.cross_chunked.cross_chunk_rows`, 128 for Qwen and SmolLM2)."""
    cross_tokenizer: CrossTokenizerConfig | None = None
    """Teacher and student with different vocabularies (online, or offline from a cache made
    with spans=true): the answer's two tokenizations are aligned by characters and compared by
    ULD or the hybrid loss, e.g. {loss: hybrid}. null: one vocabulary, token by token."""

    def __post_init__(self):
        check(0.0 <= self.beta <= 1.0, f"beta: must be in [0, 1], got {self.beta}")
        check(0.0 <= self.skew <= 1.0, f"skew: must be in [0, 1], got {self.skew}")
        check(
            math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE,
            f"temperature: must be a finite value >= {MIN_TEMPERATURE}, got {self.temperature}",
        )
        check(
            self.chunk_size is None or self.chunk_size > 0,
            f"chunk_size: must be > 0, got {self.chunk_size}",
        )
        # The registry (imported here: it imports torch) names the divergence and checks its
        # parameters, so a config accepts exactly what the losses can compute.
        from potstill.errors import ConfigError
        from potstill.losses.registry import check_divergence, divergence_names

        names = divergence_names()
        if self.divergence not in names:
            close = difflib.get_close_matches(self.divergence, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"divergence: {shown(self.divergence)} is not one of {', '.join(names)} (or a "
                f"divergence registered in potstill.losses){hint}"
            )
        try:
            check_divergence(self.divergence, self.divergence_params())
        except ConfigError as exc:
            raise ConfigError(f"divergence: {exc}") from None

    def divergence_params(self) -> dict[str, float]:
        """The keyword parameters of the divergence: beta and skew under the names the
        built-in rows use (jsd's beta, the skews' alpha), then `params`."""
        from potstill.losses.registry import divergence_names, get_divergence

        if self.divergence not in divergence_names():
            return dict(self.params)
        takes = {p.name for p in get_divergence(self.divergence).params}
        shorthands = {"beta": self.beta, "alpha": self.skew}
        return {**{k: v for k, v in shorthands.items() if k in takes}, **self.params}
