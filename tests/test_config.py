from dataclasses import dataclass, field
from pathlib import Path

import pytest

from potstill.cli.verbs import stage_configs
from potstill.config import describe, dump_yaml, field_help, from_dict, load_config
from potstill.config.sections import TrainConfig
from potstill.errors import ConfigError
from potstill.stages.quickstart import QuickstartConfig
from potstill.stages.sft import SFTConfig

from .conftest import assert_one_line_error, run_cli

CONFIGS = Path(__file__).parent.parent / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_typed_nested_config(tmp_path):
    path = write(tmp_path, "train:\n  lr: 2.0e-5\n  grad_accum: 4\nmodel:\n  name: my/model\n")
    cfg = load_config(SFTConfig, path, ["train.lr=1e-5", "model.lora.r=8"])
    assert cfg.train.lr == 1e-5  # "1e-5" parses as a YAML string; the float field converts it
    assert cfg.train.grad_accum == 4
    assert cfg.model.name == "my/model"
    assert cfg.model.lora.r == 8 and cfg.model.lora.alpha == 32
    assert cfg.data.source == "runs/curate/kept.jsonl"  # untouched defaults stay


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 1e-5\n")
    with pytest.raises(ConfigError) as exc:
        load_config(SFTConfig, path)
    assert str(exc.value).startswith(f"{path}: train.lrr: unknown key; did you mean 'train.lr'?")


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.grad_accum: expected an integer, got str 'four'"):
        load_config(SFTConfig, write(tmp_path, "train:\n  grad_accum: four\n"))
    with pytest.raises(ConfigError, match=r"train.grad_accum: expected an integer, got bool True"):
        load_config(SFTConfig, overrides=["train.grad_accum=true"])


def test_negative_learning_rate_is_refused(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(SFTConfig, write(tmp_path, "train:\n  lr: -1.0e-5\n"))
    assert "train.lr: must be > 0, got -1e-05" in str(exc.value)


def test_literal_values_are_checked():
    with pytest.raises(ConfigError, match=r"model.dtype: 'bf16' is not one of .*did you mean"):
        load_config(SFTConfig, overrides=["model.dtype=bf16"])


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1\n bad: [\n")
    with pytest.raises(ConfigError) as exc:
        load_config(SFTConfig, path)
    assert str(exc.value).startswith(f"{path}:3:")
    assert "YAML syntax error" in str(exc.value)


def test_help_comes_from_field_docstrings():
    helps = field_help(TrainConfig)
    assert helps["lr"] == "Peak learning rate."
    text = describe(SFTConfig())
    assert "# Peak learning rate.\n  lr: 0.0001" in text


def test_round_trip_through_yaml():
    cfg = SFTConfig()
    assert from_dict(SFTConfig, __import__("yaml").safe_load(dump_yaml(cfg))) == cfg


@dataclass
class _Inner:
    xs: list[int] = field(default_factory=list)


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    maybe: float | None = None


def test_lists_and_optionals():
    assert from_dict(_Outer, {"inner": {"xs": [1, 2]}, "maybe": 3}).maybe == 3.0
    with pytest.raises(ConfigError, match=r"inner.xs\[1\]: expected an integer, got str 'b'"):
        from_dict(_Outer, {"inner": {"xs": [1, "b"]}})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    stage = path.stem.split("-")[0]
    assert stage in stage_configs(), (
        f"{path.name}: name it after its stage ({', '.join(stage_configs())})"
    )
    load_config(stage_configs()[stage], path)


def test_shipped_quickstart_yaml_matches_the_defaults():
    assert load_config(QuickstartConfig, CONFIGS / "quickstart.yaml") == QuickstartConfig()


@pytest.mark.slow
def test_cli_config_errors_are_one_line_exit_2(tmp_path):
    bad_lr = write(tmp_path, "train:\n  lr: -0.1\n")
    assert_one_line_error(
        run_cli("config", "check", "sft", "-c", str(bad_lr)), "train.lr: must be > 0"
    )
    unknown = run_cli("config", "check", "sft", "--set", "trian.lr=1")
    assert_one_line_error(unknown, "trian: unknown key; did you mean 'train'?")
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("model: {name: x\n")
    assert_one_line_error(run_cli("config", "check", "sft", "-c", str(syntax)), "YAML syntax error")
    ok = run_cli("config", "check", "sft", "--set", "train.lr=3e-5")
    assert ok.returncode == 0 and "lr: 3.0e-05" in ok.stdout


@pytest.mark.parametrize(
    "path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_accelerate_config_loads_in_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cluster = ClusterConfig.from_yaml_file(str(path))
    expected = "no" if cluster.use_cpu else "bf16"  # CPUs here have no fast bf16 matmul
    assert cluster.mixed_precision == expected and cluster.num_processes >= 1


def test_a_bad_value_inside_an_optional_section_names_itself():
    """lora is `LoraConfig | None`: a mapping with a bad rank is that section's error, not
    "expected a mapping or null, got dict"."""
    from potstill.errors import ConfigError
    from potstill.stages.sft import SFTConfig

    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, overrides=["model.lora={r: 0}"])
    assert str(err.value) == "model.lora.r: must be a positive integer, got 0"
