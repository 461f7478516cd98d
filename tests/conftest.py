"""Shared fixtures: tiny random Qwen2 models with real (tiny) tokenizers, built in seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DIVERGENCE_PARAMS = {
    "jsd": {"beta": 0.3},
    "skew_forward_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.2},
}
"""A non-trivial parameter for each divergence that takes one (loss tests)."""

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Calculate 5 - 3 - 6. The answer is -4.",
    "What is 17 + 25? Answer: 42",
    "Let's think step by step. First add, then subtract.",
    "question solution answer explanation teacher student 0 1 2 3 4 5 6 7 8 9",
]


def build_tokenizer(vocab_size: int = 320, corpus: list[str] = CORPUS):
    """A byte-level BPE tokenizer trained in milliseconds, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def build_model(tokenizer, seed: int = 0, hidden: int = 32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Qwen2 model + tokenizer: a real Hugging Face model directory."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def other_vocab_dir(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer has a different vocabulary (for mismatch errors)."""
    path = tmp_path_factory.mktemp("tiny-other-vocab")
    tokenizer = build_tokenizer(vocab_size=300, corpus=["zebra yak xylophone"] + CORPUS[2:])
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def potstill_home(tmp_path, monkeypatch) -> Path:
    """An empty, private POTSTILL_HOME."""
    home = tmp_path / "potstill-home"
    monkeypatch.setenv("POTSTILL_HOME", str(home))
    return home


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run the real `potstill` CLI in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("POTSTILL_DEBUG", None)
    return run_in_group([sys.executable, "-m", "potstill", *args], cwd=cwd, env=full_env)


def run_in_group(cmd: list[str], *, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """Run `cmd` in a process group of its own, capturing text output; on timeout kill the whole
    group (a launcher's worker ranks included, so nothing outlives the test) and fail."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        **popen,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"{cmd[:6]} ran past {timeout} s; its process group was killed\n{stderr[-3000:]}"
        ) from None
    finally:
        kill_group(proc)  # ranks a launcher left behind when it exited
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of `proc`'s group (started with start_new_session=True)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def assert_one_line_error(proc, *fragments: str) -> str:
    """Exit 2, one `error:` line on stderr holding each fragment, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture
def workdir(tmp_path):
    """A directory with earlier results in its `run/`: a refused command must leave them as they
    are (the bad-input suites compare its tree before and after)."""
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "keep.txt").write_text("earlier results")
    (run / "samples" / "part-00000.jsonl").write_text('{"id": "old", "question": "q"}\n')
    (run / "scored.jsonl").write_text('{"id": "old", "rlt_reward": 0.5}\n')
    return tmp_path
