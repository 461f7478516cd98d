"""The divergence registry: it lists exactly the built-ins, every closed-form kernel equals autograd
through its core, a divergence registered with no kernel works on every loss path, and bad names
and parameters are one-line ConfigErrors."""

import inspect
import math
import warnings

import pytest
import torch

from potstill.errors import ConfigError
from potstill.losses import (
    DIVERGENCES,
    Divergence,
    Param,
    TeacherHidden,
    TeacherLogits,
    TeacherTopK,
    check_divergence,
    chunked_kd_loss,
    divergence_names,
    divergences,
    get_divergence,
    kd_loss,
    register,
    sparse_divergence,
    unregister,
)
from potstill.losses.fused import autograd_kernel

from .conftest import DIVERGENCE_PARAMS as PARAMS

BUILTINS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
N, H, V = 37, 10, 29


def test_registry_lists_exactly_the_existing_divergences():
    assert divergence_names() == BUILTINS
    assert tuple(DIVERGENCES) == BUILTINS and len(DIVERGENCES) == 6
    takes = {name: get_divergence(name).defaults for name in BUILTINS}
    assert takes == {
        "forward_kl": {},
        "reverse_kl": {},
        "jsd": {"beta": 0.5},
        "skew_forward_kl": {"alpha": 0.1},
        "skew_reverse_kl": {"alpha": 0.1},
        "tvd": {},
    }
    assert all(get_divergence(name).kernel is not None for name in BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_row_defaults_are_the_public_functions_and_cores_defaults(name):
    row = get_divergence(name)
    for fn in (getattr(divergences, name), row.core):
        signature = inspect.signature(fn).parameters
        own = {k: p.default for k, p in signature.items() if k in row.defaults}
        assert own == row.defaults, fn.__name__


def _autograd_reference(core, z, t, temperature, params):
    """value and ∂D/∂(z/T) in float64 by autograd through the core, straight from the logits."""
    s = (z.double() / temperature).requires_grad_()
    log_p = torch.log_softmax(t.double() / temperature, -1)
    value = core(torch.log_softmax(s, -1), log_p, **params)
    (grad,) = torch.autograd.grad(value.sum(), s)
    return value.detach(), grad


@pytest.mark.parametrize("name", divergence_names())
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_kernel_equals_autograd_through_its_core(name, temperature):
    row = get_divergence(name)
    g = torch.Generator().manual_seed(11)
    z, t = torch.randn(24, V, generator=g) * 3, torch.randn(24, V, generator=g) * 3
    t[0, 3] = 40.0  # a near one-hot teacher row: the mixtures' tiny probabilities
    params = row.bind(PARAMS.get(name, {}))
    log_q, log_p = torch.log_softmax(z / temperature, -1), torch.log_softmax(t / temperature, -1)
    want_value, want_grad = _autograd_reference(row.core, z, t, temperature, params)
    for kernel in (row.kernel, autograd_kernel(row.core)):
        value, grad = kernel(log_q, log_q.exp(), log_p, log_p.exp(), **params)
        assert value.shape == (24,) and grad.shape == (24, V)
        torch.testing.assert_close(value.double(), want_value, rtol=0, atol=1e-5)
        torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=1e-5)
        # The check has teeth: the gradient is far from zero.
        assert want_grad.abs().max() > 1e-2


def hellinger_core(log_q, log_p):
    """Squared Hellinger distance ½ Σ (√p − √q)² per token. (..., V), (..., V) -> (...)"""
    return 0.5 * ((0.5 * log_p).exp() - (0.5 * log_q).exp()).square().sum(-1)


def amari_core(log_q, log_p, order):
    """Amari α-divergence (1 − Σ p^α q^(1−α)) / (α (1 − α)). (..., V), (..., V) -> (...)"""
    overlap = (order * log_p + (1.0 - order) * log_q).exp().sum(-1)
    return (1.0 - overlap) / (order * (1.0 - order))


@pytest.fixture
def throwaways():
    """Two core-only divergences, registered for one test and removed after it."""
    rows = [
        register(Divergence("test_hellinger", hellinger_core)),
        register(Divergence("test_amari", amari_core, None, (Param("order", 0.5, 0.05, 0.95),))),
    ]
    try:
        yield rows
    finally:
        for row in rows:
            unregister(row.name)


def _reference_loss(z, t, labels, temperature, kd_ratio, name, params):
    """The mixed loss in float64 from the definitions (not from the registry's code)."""
    mask = labels != -100
    q = torch.softmax(z.double() / temperature, -1)[mask]
    p = torch.softmax(t.double() / temperature, -1)[mask]
    if name == "test_hellinger":
        soft = 0.5 * (p.sqrt() - q.sqrt()).square().sum(-1)
    else:
        a = params["order"]
        soft = (1 - (p**a * q ** (1 - a)).sum(-1)) / (a * (1 - a))
    ce = torch.nn.functional.cross_entropy(z.double()[mask], labels[mask], reduction="none")
    mixed = (1 - kd_ratio) * ce + kd_ratio * temperature**2 * soft
    return mixed.sum() / mask.sum()


@pytest.mark.parametrize(
    ("name", "params"), [("test_hellinger", {}), ("test_amari", {"order": 0.3})]
)
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden"])
def test_a_core_only_divergence_through_the_fused_loss(throwaways, name, params, teacher_kind):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.7).requires_grad_()
    t_hidden, t_weight = torch.randn(N, 8, generator=g), torch.randn(V, 8, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 9, 30]] = -100
    t_logits = t_hidden @ t_weight.T
    teacher = (
        TeacherLogits(t_logits) if teacher_kind == "logits" else TeacherHidden(t_hidden, t_weight)
    )
    kwargs = dict(divergence=name, temperature=1.7, kd_ratio=0.8, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # compile=True must not try (and fail) to compile autograd
        out = chunked_kd_loss(hidden, weight, labels, teacher, chunk_size=8, compile=True, **kwargs)
    want = _reference_loss(hidden @ weight.T, t_logits, labels, 1.7, 0.8, name, params)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    got_grads = torch.autograd.grad(out.loss, [hidden, weight])
    want_grads = torch.autograd.grad(want, [hidden, weight])
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert want_grads[1].abs().max() > 1e-3  # a gradient worth comparing
    plain = kd_loss(hidden @ weight.T, labels, TeacherLogits(t_logits), **kwargs)
    torch.testing.assert_close(plain.loss.double(), want, rtol=1e-5, atol=1e-6)
    assert out.soft_sum == pytest.approx(plain.soft_sum, rel=1e-5) and out.soft_sum > 0


def test_a_registered_divergence_is_live_everywhere(throwaways):
    assert divergence_names()[-2:] == ("test_hellinger", "test_amari")
    assert "test_hellinger" in DIVERGENCES and len(DIVERGENCES) == 8
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 6, V, generator=g) * 2, torch.randn(4, 6, V, generator=g) * 2
    p, q = torch.softmax(t.double() / 2, -1), torch.softmax(s.double() / 2, -1)
    want = 0.5 * (p.sqrt() - q.sqrt()).square().sum(-1)
    got = DIVERGENCES["test_hellinger"](s, t, temperature=2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    top = torch.log_softmax(t / 2, -1).topk(V, -1)  # k = V: the sparse path equals the dense one
    sparse = sparse_divergence(
        s, top.indices, top.values, divergence="test_hellinger", temperature=2
    )
    torch.testing.assert_close(sparse.double(), want, rtol=1e-5, atol=1e-6)
    # Its row's parameter range is enforced like the built-ins'.
    with pytest.raises(ConfigError, match=r"order must be in \[0.05, 0.95\], got 1.0"):
        DIVERGENCES["test_amari"](s, t, order=1.0)
    unregister("test_hellinger")
    register(throwaways[0])  # the fixture removes it again
    assert divergence_names()[-1] == "test_hellinger"


def test_a_top_k_teacher_with_a_core_only_divergence(throwaways):
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = torch.randn(V, H, generator=g).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    top = torch.log_softmax(torch.randn(N, V, generator=g), -1).topk(5, -1)
    teacher = TeacherTopK(top.indices, top.values)
    chunked = chunked_kd_loss(
        hidden, weight, labels, teacher, divergence="test_amari", chunk_size=8
    )
    plain = kd_loss(hidden @ weight.T, labels, teacher, divergence="test_amari")
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(
        torch.autograd.grad(chunked.loss, [hidden, weight]),
        torch.autograd.grad(plain.loss, [hidden, weight]),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_left_out_parameters_take_the_rows_default_on_every_path(name):
    """The fused kernel used to get 0.0 for a left-out β/α (jsd then gave a zero soft loss)."""
    g = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    labels, t_logits = torch.randint(0, V, (N,), generator=g), torch.randn(N, V, generator=g) * 3
    teacher = TeacherLogits(t_logits)
    default = chunked_kd_loss(hidden, weight, labels, teacher, divergence=name, kd_ratio=1.0)
    explicit = kd_loss(
        hidden @ weight.T,
        labels,
        teacher,
        divergence=name,
        kd_ratio=1.0,
        **get_divergence(name).defaults,
    )
    torch.testing.assert_close(default.loss, explicit.loss, rtol=1e-5, atol=1e-6)
    assert default.loss > 1e-2


KNOWN = "forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd"


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("kl", {}, f"unknown divergence 'kl'; choose one of {KNOWN}"),
        ("jsd", {"beta": 1.5}, "beta must be in [0, 1], got 1.5"),
        ("jsd", {"beta": float("nan")}, "beta must be in [0, 1], got nan"),
        ("skew_reverse_kl", {"alpha": -0.1}, "alpha must be in [0, 1], got -0.1"),
        ("skew_forward_kl", {"alpha": "0.2"}, "alpha must be a number, got '0.2'"),
        ("jsd", {"beta": True}, "beta must be a number, got True"),
        ("jsd", {"alpha": 0.1}, "divergence 'jsd' takes only beta, got alpha"),
        (
            "tvd",
            {"beta": 0.5, "alpha": 0.1},
            "divergence 'tvd' takes no parameters, got alpha, beta",
        ),
    ],
)
def test_bad_names_and_parameters_are_one_line_config_errors(name, params, message):
    with pytest.raises(ConfigError) as exc:
        check_divergence(name, params)
    assert str(exc.value) == message and "\n" not in message


def test_good_names_and_parameters_pass_and_unknown_names_list_registered_ones(throwaways):
    assert check_divergence("jsd", {"beta": 0}) is None
    assert check_divergence("skew_forward_kl", {}) is None and check_divergence("tvd") is None
    with pytest.raises(ConfigError, match=f"choose one of {KNOWN}, test_hellinger, test_amari$"):
        check_divergence("hellinger", {})
    with pytest.raises(KeyError):
        DIVERGENCES["hellinger"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (Divergence("jsd", hellinger_core), "divergence 'jsd' is already registered"),
        (Divergence("my-div", hellinger_core), "divergence name must be an identifier"),
        (Divergence("x", hellinger_core, "kernel"), "kernel must be callable or None"),
        (
            Divergence("x", amari_core, None, (Param("order", 2.0),)),
            "default order=2.0 out of range",
        ),
        (
            Divergence("x", amari_core, None, (Param("temperature", 0.5),)),
            "temperature is a loss argument",
        ),
    ],
)
def test_malformed_rows_are_refused_at_registration(row, message):
    with pytest.raises(ValueError, match=message):
        register(row)
    assert divergence_names() == BUILTINS


def test_a_registered_divergence_trains_a_distill_step_through_the_config(
    throwaways, tiny_model_dir, tmp_path
):
    """One function + one registry row is all a new divergence needs: the config accepts it
    (with its own parameter, through loss.params) and `distill` trains with it."""
    from rich.console import Console
    from safetensors.torch import load_file

    from potstill.config import load_config
    from potstill.stages.distill import DistillConfig, run_distill

    from .distill_helpers import distill_overrides, make_teacher_dir, write_data

    teacher, data = make_teacher_dir(tmp_path / "teacher"), write_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    overrides = distill_overrides(
        tiny_model_dir, teacher, data, out, "train.max_steps=1", "train.save_every=1",
        "loss.divergence=test_amari", "loss.params={order: 0.3}", "loss.kd_ratio.value=1.0",
    )  # fmt: skip
    result = run_distill(load_config(DistillConfig, overrides=overrides), Console(quiet=True))
    assert result["step"] == 1 and math.isfinite(result["soft"]) and result["soft"] > 0
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    with pytest.raises(ConfigError, match="order must be in \\[0.05, 0.95\\], got 2.0"):
        load_config(DistillConfig, overrides=[*overrides, "loss.params={order: 2.0}"])
