"""The public API: `import potstill as ps` is light, every exported name resolves, the stages
take dataclasses, dicts or YAML with the CLI's validation, and docs/api.md's example runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import potstill as ps
from potstill.cli.verbs import VERBS

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_import_potstill_loads_no_torch():
    code = "import sys, potstill; potstill.sft; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_exported_name_resolves_and_every_stage_is_a_function():
    for name in ps.__all__:
        assert getattr(ps, name) is not None, name
    from potstill.api import API_NAMES, STAGES

    assert sorted(STAGES) == sorted(API_NAMES.get(key, key) for key in VERBS)
    assert all(name in ps.__all__ and callable(getattr(ps, name)) for name in STAGES)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ps.nope  # noqa: B018


def test_a_config_from_a_dict_a_dataclass_or_yaml_is_the_same(tmp_path):
    from potstill.config import dump_yaml

    as_dict = ps.resolve_config("sft", {"train": {"lr": 0.5}}, ["train.max_steps=3"])
    assert (as_dict.train.lr, as_dict.train.max_steps) == (0.5, 3)
    assert ps.resolve_config("sft", as_dict) == as_dict
    path = tmp_path / "sft.yaml"
    path.write_text(dump_yaml(as_dict))
    assert ps.resolve_config("sft", str(path)) == as_dict


def test_bad_input_is_the_clis_error(tmp_path):
    from .conftest import run_cli

    with pytest.raises(ps.ConfigError) as err:
        ps.sft({"train": {"lr": -1}})
    proc = run_cli("sft", "--set", "train.lr=-1", "--set", f"run.output_dir={tmp_path / 'x'}")
    assert proc.stderr.strip() == f"error: {err.value}"
    with pytest.raises(ps.ConfigError, match="expected a SFTConfig, got a DistillConfig"):
        ps.sft(VERBS["distill"].config_class()())


def test_the_documented_example_runs(tiny_model_dir, tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    code = code.replace('MODEL = "qwen2.5-coder-0.5b-instruct"', f'MODEL = "{tiny_model_dir}"')
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["result"]["step"] == 2
    assert (tmp_path / "runs" / "api-demo" / "sft" / "final" / "adapter_config.json").is_file()
    assert namespace["student_logits"].shape == (3, 11)


def test_stage_functions_survive_importing_every_module():
    """A stage function named like a subpackage would be replaced by the package on import."""
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(ps.__path__, "potstill."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    from potstill.api import STAGES

    assert [n for n in STAGES if not callable(getattr(ps, n))] == []
