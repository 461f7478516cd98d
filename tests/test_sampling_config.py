"""One sampling section: every stage that samples extends `SamplingConfig`, so each field has one
meaning, one help text and one check."""

from __future__ import annotations

import dataclasses

import pytest

from potstill.cli.verbs import VERBS
from potstill.config import describe, field_help, from_dict
from potstill.config.sections import GenerationConfig, SamplingConfig
from potstill.curate.pipeline import RewriteConfig
from potstill.errors import ConfigError
from potstill.rlt.config import ExplainSampling, GRPOConfig
from potstill.train.kd_config import OnPolicyConfig

TEMPERATURE = "temperature: must be 0 (greedy) or a finite value >= 0.01, got "
SAMPLERS = (GenerationConfig, RewriteConfig, ExplainSampling, GRPOConfig, OnPolicyConfig)


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
def test_every_sampler_extends_the_one_section_and_documents_every_field(cls):
    assert issubclass(cls, SamplingConfig)
    helps = field_help(cls)
    undocumented = [f.name for f in dataclasses.fields(cls) if not helps.get(f.name)]
    assert undocumented == []


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("temperature", float("inf"), TEMPERATURE + "inf"),
        ("temperature", 1e-30, TEMPERATURE + "1e-30"),
        ("temperature", -1.0, TEMPERATURE + "-1.0"),
        ("top_p", 0.0, "top_p: must be in (0, 1], got 0.0"),
        ("top_p", float("nan"), "top_p: must be in (0, 1], got nan"),
        ("max_new_tokens", 0, "max_new_tokens: must be a positive integer, got 0"),
    ],
)  # fmt: skip
def test_one_check_for_every_sampler(cls, key, value, message):
    with pytest.raises(ConfigError) as err:
        from_dict(cls, {key: value})
    assert message in str(err.value)


def test_grpo_refuses_greedy_sampling_with_its_reason():
    with pytest.raises(ConfigError, match="GRPO needs different samples per group"):
        from_dict(GRPOConfig, {"temperature": 0.0})


def test_a_subclass_keeps_its_own_defaults():
    assert (GenerationConfig().temperature, GRPOConfig().temperature) == (0.0, 0.7)
    assert (RewriteConfig().max_new_tokens, OnPolicyConfig().max_new_tokens) == (4096, 128)


@pytest.mark.parametrize("key", sorted(VERBS))
def test_config_show_renders_every_stage(key):
    text = describe(VERBS[key].config_class()())
    assert text.count("\n") > 5 and "object at 0x" not in text
