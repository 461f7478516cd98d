"""Config YAML: a key written twice is refused (PyYAML would keep the last one silently), dates
stay text, and a file that cannot be read is one line naming it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from potstill.cli.app import main
from potstill.config import load_config, read_yaml
from potstill.errors import ConfigError
from potstill.stages.eval import EvalConfig
from potstill.stages.sft import SFTConfig


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  lr: 1.0e-5\n  grad_accum: 4\n  lr: 2.0e-5\n",
            ":4:3: duplicate key 'train.lr' (first at line 2)",
        ),
        (
            "run: {output_dir: a}\nrun: {output_dir: b}\n",
            ":2:1: duplicate key 'run' (first at line 1)",
        ),
        (
            "model:\n  lora: {r: 4, 'r': 8}\n",
            ":2:16: duplicate key 'model.lora.r' (first at line 2)",
        ),
    ],
)
def test_a_key_written_twice_is_refused_with_both_places(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    assert str(err.value) == (
        f"{path}{message}; YAML would keep only the last one, silently: delete one"
    )


def test_a_repeat_inside_a_list_item_is_named_by_its_index(tmp_path):
    path = write(tmp_path, "models:\n  - name: a\n  - name: b\n    label: x\n    label: y\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:5:5: duplicate key 'models\[1\].label'"):
        load_config(EvalConfig, path)


def test_a_merge_key_is_no_repeat_and_a_later_key_overrides_it(tmp_path):
    text = "models:\n  - &m {name: a, label: a}\n  - <<: *m\n    label: b\n"
    assert read_yaml(write(tmp_path, text)) == {
        "models": [{"name": "a", "label": "a"}, {"name": "a", "label": "b"}]
    }
    cfg = load_config(EvalConfig, write(tmp_path, text))
    assert [m.label for m in cfg.models] == ["a", "b"]


def test_a_repeat_in_an_override_value_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, overrides=["train={lr: 1.0e-5, lr: 2.0e-5}"])
    assert str(err.value) == "--set train: duplicate key 'lr' in the value"


@pytest.fixture
def keep_sigterm():
    """main() makes SIGTERM stop like Ctrl-C; give pytest its own handler back."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def test_the_cli_prints_the_duplicate_as_one_line_exit_2(
    tmp_path, capsys, monkeypatch, keep_sigterm
):
    monkeypatch.delenv("POTSTILL_DEBUG", raising=False)
    path = write(tmp_path, "train:\n  lr: 1.0e-5\n  lr: 2.0e-5\n")
    assert main(["config", "check", "sft", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {path}:3:3: duplicate key 'train.lr' (first at line 2); YAML would keep only "
        "the last one, silently: delete one\n"
    )


def test_dates_stay_text(tmp_path):
    """No field is a date; YAML would make 2024-01-01 a date (a type error for a string field)
    and 2024-13-45 a ValueError from inside the date constructor."""
    path = write(tmp_path, "run:\n  output_dir: 2024-01-01\ndata:\n  source: 2024-13-45\n")
    cfg = load_config(SFTConfig, path)
    assert (cfg.run.output_dir, cfg.data.source) == ("2024-01-01", "2024-13-45")
    cfg = load_config(SFTConfig, overrides=["run.output_dir=2024-13-45"])
    assert cfg.run.output_dir == "2024-13-45"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"train:\n  seed: 1" + b"0" * 5000 + b"\n", "unreadable YAML (an integer too long"),
        (b"train: " + b"[" * 5000 + b"\n", "YAML syntax error"),
        (b"train:\n  lr: \xff\n", "not UTF-8 text (invalid start byte at byte 13)"),
        (b"- a\n- b\n", "the top level must be a mapping of sections"),
    ],
    ids=["huge int", "deep nesting", "not utf-8", "a list"],
)
def test_an_unreadable_file_is_one_line_naming_it(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    text = str(err.value)
    assert text.startswith(str(path)) and message in text, text
    assert len(text.splitlines()) == 1
