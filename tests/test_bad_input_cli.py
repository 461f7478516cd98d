"""The Foundation issue's bad inputs through the real CLI: exit 2, one line, nothing written."""

import hashlib
from pathlib import Path

import pytest

from .conftest import assert_one_line_error, run_cli


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("earlier results")
    return tmp_path


def data_case(content: bytes):
    def make(d: Path):
        (d / "data.jsonl").write_bytes(content)
        return ["data", "check", str(d / "data.jsonl")]

    return make


def yaml_case(content: str):
    def make(d: Path):
        (d / "cfg.yaml").write_text(content)
        return ["config", "check", "sft", "-c", str(d / "cfg.yaml")]

    return make


def model_case(spec_of):
    def make(d: Path):
        sets = [
            f"student.name={spec_of(d)}",
            f"run.output_dir={d / 'run'}",
            "data.train=rg:chain_sum?size=4&seed=1",
        ]
        return ["quickstart"] + [arg for s in sets for arg in ("--set", s)]

    return make


def _garbage_gguf(d: Path) -> Path:
    (d / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    return d / "m.gguf"


CASES = {
    "unknown model name": (
        model_case(lambda d: "qwen2.5-coder-0.5b"),
        ["unknown model 'qwen2.5-coder-0.5b': did you mean"],
    ),
    "missing directory": (model_case(lambda d: d / "no-model"), ["model directory not found"]),
    "corrupt gguf": (model_case(_garbage_gguf), ["m.gguf: not a readable GGUF file"]),
    "unknown kit model": (
        lambda d: ["models", "prepare", "llama-70b"],
        ["unknown offline model 'llama-70b'"],
    ),
    "malformed jsonl line": (
        data_case(b'{"question": "a"}\n{"question": \n'),
        ["data.jsonl:2: malformed JSON"],
    ),
    "missing question": (
        data_case(b'{"answer": "4"}\n'),
        ["data.jsonl:1: missing required field 'question'"],
    ),
    "non-string field": (
        data_case(b'{"question": ["a"]}\n'),
        ["field 'question' must be a string, got list"],
    ),
    "invalid utf-8": (
        data_case(b'{"question": "\xff"}\n'),
        ["data.jsonl:1: invalid UTF-8 at byte 14"],
    ),
    "duplicate ids": (
        data_case(b'{"id": "a", "question": "x"}\n{"id": "a", "question": "y"}\n'),
        ["duplicate id 'a'"],
    ),
    "empty dataset": (data_case(b"\n\n"), ["empty dataset"]),
    "yaml syntax error": (yaml_case("train: [1, 2\n"), ["cfg.yaml:2:1: YAML syntax error"]),
    "unknown config key": (
        yaml_case("train:\n  learning_rate: 1.0e-5\n"),
        ["train.learning_rate: unknown key"],
    ),
    "negative learning rate": (
        yaml_case("train:\n  lr: -1.0e-5\n"),
        ["train.lr: must be > 0, got -1e-05"],
    ),
    "missing config file": (
        lambda d: ["rlt", "warmup", "--config", "x.yaml"],
        ["config file not found: x.yaml"],
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, workdir):
    make_args, fragments = CASES[name]
    args = make_args(workdir)
    before = tree_hash(workdir)
    assert_one_line_error(run_cli(*args), *fragments)
    assert tree_hash(workdir) == before


@pytest.mark.slow
def test_vocab_mismatch(tiny_model_dir, other_vocab_dir):
    proc = run_cli("models", "check-vocab", str(tiny_model_dir), str(other_vocab_dir))
    assert_one_line_error(proc, "teacher and student tokenizers differ", "ids differ")
    ok = run_cli("models", "check-vocab", str(tiny_model_dir), str(tiny_model_dir))
    assert ok.returncode == 0 and "one vocabulary" in ok.stdout


def test_usage_errors_exit_2_without_a_traceback():
    for args in (["generate", "--bogus"], ["rlt", "score", "--teacher", "x"]):
        proc = run_cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "Error: " in proc.stderr
