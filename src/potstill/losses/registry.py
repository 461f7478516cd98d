"""The one registry of divergences: one `Divergence` row per name, read by every loss path.

A row holds the divergence's core (on log-probabilities; used by the plain, sparse and chunked
losses), its closed-form kernel for the fused chunked loss (or None: that path then takes the
gradient by autograd through the core, see `potstill.losses.fused.autograd_kernel`) and its
parameters with their defaults and ranges. Adding a divergence is one function and one
`register(Divergence(...))` call (docs/losses.md, "Adding a divergence").

    core(log_q, log_p, **params) -> (...)                       log_q, log_p: (..., V)
    kernel(log_q, q, log_p, p, **params) -> ((c,), (c, V))      value and ∂D/∂(z / T)

`DIVERGENCES` (name -> fn(student_logits, teacher_logits, *, temperature=1.0, **params)) is a live
view of the rows, so nothing else lists divergences by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

import potstill.losses.divergences as d
import potstill.losses.fused as f
from potstill.errors import ConfigError

Tensor = torch.Tensor


@dataclass(frozen=True)
class Param:
    """One scalar parameter of a divergence: its keyword name, default and closed range."""

    name: str
    default: float
    low: float = 0.0
    high: float = 1.0

    def check(self, value) -> float:
        # bool is an int to Python, but `beta: true` in a config is a mistake, not 1.0.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.name} must be a number, got {value!r}")
        if not self.low <= value <= self.high:  # also refuses NaN
            raise ConfigError(f"{self.name} must be in [{self.low:g}, {self.high:g}], got {value}")
        return float(value)


@dataclass(frozen=True)
class Divergence:
    """A soft loss between the teacher's p and the student's q, per token: one registry row."""

    name: str
    core: Callable[..., Tensor]
    """(log_q (..., V), log_p (..., V), **params) -> (...), on normalised log-probabilities."""
    kernel: Callable[..., tuple[Tensor, Tensor]] | None = None
    """(log_q, q, log_p, p (c, V), **params) -> value (c,), ∂D/∂s (c, V) with s = z / T; None
    when there is no closed form (the fused loss then uses autograd through `core`)."""
    params: tuple[Param, ...] = ()

    @property
    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.params}

    def bind(self, params: Mapping[str, float] | None = None) -> dict[str, float]:
        """`params` checked against this row, defaults filled in: the keywords for core/kernel."""
        params = dict(params or {})
        allowed = [p.name for p in self.params]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            takes = f"takes only {', '.join(allowed)}" if allowed else "takes no parameters"
            raise ConfigError(f"divergence '{self.name}' {takes}, got {', '.join(unknown)}")
        return {p.name: p.check(params.get(p.name, p.default)) for p in self.params}


_ROWS: dict[str, Divergence] = {}
RESERVED = (
    "temperature",
    "divergence",
    "kd_ratio",
    "tail",
    "chunk_size",
    "compile",
    "ignore_index",
    "num_target_tokens",
    "student_bias",
)
"""Keywords of kd_loss / chunked_kd_loss: a parameter named so could never reach the core."""


def register(divergence: Divergence, *, replace: bool = False) -> Divergence:
    """Add a row (or, with `replace`, swap one); returns it. Refuses malformed rows at once, so a
    mistake shows at import rather than mid-training."""
    name = divergence.name
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"divergence name must be an identifier, got {name!r}")
    if name in _ROWS and not replace:
        raise ValueError(f"divergence '{name}' is already registered; pass replace=True")
    if not callable(divergence.core):
        raise ValueError(f"divergence '{name}': core must be callable")
    if divergence.kernel is not None and not callable(divergence.kernel):
        raise ValueError(f"divergence '{name}': kernel must be callable or None")
    names = [p.name for p in divergence.params]
    if len(set(names)) != len(names):
        raise ValueError(f"divergence '{name}': parameter names must be unique, got {names}")
    taken = sorted(set(names) & set(RESERVED))
    if taken:
        raise ValueError(f"divergence '{name}': {', '.join(taken)} is a loss argument already")
    for p in divergence.params:
        if not (p.low <= p.default <= p.high):
            raise ValueError(f"divergence '{name}': default {p.name}={p.default} out of range")
    _ROWS[name] = divergence
    return divergence


def unregister(name: str) -> Divergence:
    """Remove a row (tests register throwaway divergences and take them out again)."""
    return _ROWS.pop(get_divergence(name).name)


def divergence_names() -> tuple[str, ...]:
    """Every registered name, in registration order (the built-ins first)."""
    return tuple(_ROWS)


def get_divergence(name: str) -> Divergence:
    if name not in _ROWS:
        raise ConfigError(f"unknown divergence '{name}'; choose one of {', '.join(_ROWS)}")
    return _ROWS[name]


def check_divergence(name: str, params: Mapping[str, float] | None = None) -> None:
    """Raise ConfigError (one line) unless `name` is registered and `params` fit it."""
    get_divergence(name).bind(params)


def resolve(name: str, params: Mapping[str, float] | None = None) -> tuple[Divergence, dict]:
    """The row for `name` and its checked parameters with defaults filled in."""
    divergence = get_divergence(name)
    return divergence, divergence.bind(params)


def logits_function(name: str) -> Callable[..., Tensor]:
    """fn(student_logits, teacher_logits, *, temperature=1.0, **params) for any registered row:
    (..., V), (..., V) -> (...), float32 at least, like `potstill.losses.forward_kl`."""
    divergence = get_divergence(name)

    def fn(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, **params):
        bound = divergence.bind(params)
        return divergence.core(*d.prepare(student_logits, teacher_logits, temperature), **bound)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"The '{name}' divergence per token from logits. (..., V), (..., V) -> (...)"
    return fn


class _LogitsFunctions(Mapping):
    """Read-only, always current: name -> logits-level function of that registry row."""

    def __getitem__(self, name: str) -> Callable[..., Tensor]:
        if name not in _ROWS:
            raise KeyError(name)
        return logits_function(name)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_ROWS))

    def __len__(self) -> int:
        return len(_ROWS)

    def __repr__(self) -> str:
        return f"DIVERGENCES({', '.join(_ROWS)})"


DIVERGENCES: Mapping[str, Callable[..., Tensor]] = _LogitsFunctions()


# The built-in rows: the only place a divergence's name, core, kernel and parameters meet.
_BETA = Param("beta", 0.5)
"""jsd: the mixture weight β of m = β p + (1 − β) q."""
_ALPHA = Param("alpha", 0.1)
"""skew KLs: the skew α."""
for _row in (
    Divergence("forward_kl", d.forward_kl_core, f.forward_kl_kernel),
    Divergence("reverse_kl", d.reverse_kl_core, f.reverse_kl_kernel),
    Divergence("jsd", d.jsd_core, f.jsd_kernel, (_BETA,)),
    Divergence("skew_forward_kl", d.skew_forward_kl_core, f.skew_forward_kl_kernel, (_ALPHA,)),
    Divergence("skew_reverse_kl", d.skew_reverse_kl_core, f.skew_reverse_kl_kernel, (_ALPHA,)),
    Divergence("tvd", d.tvd_core, f.tvd_kernel),
):
    register(_row)
del _row
