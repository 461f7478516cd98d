"""The vllm backend: a clear one-line error without vLLM; with it, the same greedy text as `hf`."""

from __future__ import annotations

import sys

import pytest

from potstill.errors import ModelError
from potstill.teacher.backends import Request, Sampling
from potstill.teacher.vllm_backend import VLLMBackend
from tests.conftest import build_model, build_tokenizer


def test_missing_vllm_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails as if not installed
    with pytest.raises(ModelError) as info:
        VLLMBackend("any/model")
    message = str(info.value)
    assert "\n" not in message
    assert "pip install 'potstill[vllm]'" in message
    assert "backend.kind: hf" in message


def test_broken_vllm_shows_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("import potstill_no_such_dependency\n")
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="potstill_no_such_dependency"):
        VLLMBackend("any/model")


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """A tiny Qwen2 with head size 32: vLLM's attention kernels take no smaller heads."""
    path = tmp_path_factory.mktemp("tiny-qwen2-vllm")
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden=128).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_vllm_generates_like_hf(vllm_model_dir, monkeypatch):
    vllm = pytest.importorskip("vllm")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.teacher.hf_backend import HFBackend

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; only read by vLLM's CPU build
    questions = ["What is 17 + 25?", "Calculate 5 - 3 - 6.", "Let's think step by step."]
    requests = [
        Request(key=f"r{i}", messages=({"role": "user", "content": q},), seed=i)
        for i, q in enumerate(questions)
    ]
    requests.append(Request(key="pre", messages=requests[0].messages, seed=7, prefill="The"))
    greedy = Sampling(max_new_tokens=8)
    sampled = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9)

    with VLLMBackend(
        str(vllm_model_dir), dtype="float32", max_model_len=256, enforce_eager=True
    ) as backend:
        assert backend.describe() == {
            "backend": "vllm",
            "model": str(vllm_model_dir),
            "vllm": vllm.__version__,
        }
        assert backend.context_length == 256
        got = {r.key: g for r, g in backend.generate(requests, greedy)}
        batched = {r.key: g.text for r, g in backend.generate(requests, sampled)}
        alone = {r.key: g.text for r, g in backend.generate(requests[1:2], sampled)}
        prompt_lengths = {r.key: backend.prompt_tokens(r) for r in requests}

    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32)
    hf = HFBackend(model.eval(), AutoTokenizer.from_pretrained(vllm_model_dir))
    want = {r.key: g for r, g in hf.generate(requests, greedy)}

    assert sorted(got) == sorted(r.key for r in requests)
    for request in requests:
        mine, ref = got[request.key], want[request.key]
        # A random model emits stray UTF-8 bytes: HF decodes each as U+FFFD, vLLM's streaming
        # detokenizer drops them. Same tokens, so the rest of the text must match.
        assert mine.text.replace("\ufffd", "") == ref.text.replace("\ufffd", ""), request.key
        assert mine.finish_reason == ref.finish_reason, request.key
        assert mine.completion_tokens == ref.completion_tokens, request.key
        assert mine.prompt_tokens == ref.prompt_tokens == prompt_lengths[request.key]
    assert alone["r1"] == batched["r1"]  # a request's sample depends on its seed alone
