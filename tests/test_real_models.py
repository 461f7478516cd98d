"""Real pretrained models from the offline kit (downloaded once into the potstill cache)."""

import pytest
import torch

from potstill.errors import ModelError
from potstill.kit import KIT, fetch_gguf, kit_status, prepare
from potstill.models import check_same_vocab, load_model, load_tokenizer
from potstill.teacher.backends import Sampling, complete
from potstill.teacher.hf_backend import HFBackend

pytestmark = pytest.mark.slow


def test_smollm2_prepares_loads_tokenises_and_generates():
    path = prepare("smollm2-135m-instruct")
    assert kit_status("smollm2-135m-instruct") == "ready"
    assert (path / "model.safetensors").is_file() and (path / "potstill-model.json").is_file()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", device="cpu")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer("The capital of France is")["input_ids"]
    assert tokenizer.decode(ids) == "The capital of France is"
    backend = HFBackend(model, tokenizer)
    out = complete(backend, ["What is the capital of France?"], Sampling(max_new_tokens=12))[0]
    assert "Paris" in out.text
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_same_vocab(load_tokenizer("qwen2.5-coder-0.5b-instruct"), tokenizer)


def test_qwen_05b_answers_17_plus_25():
    tokenizer = load_tokenizer("qwen2.5-coder-0.5b-instruct")
    model = load_model("qwen2.5-coder-0.5b-instruct", device="cpu")
    out = complete(HFBackend(model, tokenizer), ["What is 17+25?"], Sampling(max_new_tokens=24))
    assert "42" in out[0].text


def test_gguf_file_spec_converts_once_and_truncation_is_caught(tmp_path, potstill_home):
    gguf = fetch_gguf(KIT["smollm2-135m-instruct"], tmp_path / "smol.gguf")
    truncated = tmp_path / "cut.gguf"
    with open(gguf, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(gguf.stat().st_size // 2))
    with pytest.raises(
        ModelError,
        match=r"cut.gguf: (truncated GGUF file|not a readable GGUF file .*corrupt or truncated)",
    ):
        load_model(truncated)
    assert not (potstill_home / "converted").exists()  # a bad file leaves no trace in the cache

    model = load_model(gguf, device="cpu")
    assert model.dtype == torch.float32
    assert len(list((potstill_home / "converted").iterdir())) == 1
    tokenizer = load_tokenizer(gguf)  # reuses the converted directory
    assert len(list((potstill_home / "converted").iterdir())) == 1
    assert tokenizer.eos_token == "<|im_end|>"
