import numpy as np
import pytest
import torch

from potstill.errors import ModelError
from potstill.kit.convert import check_gguf
from potstill.models import (
    LoraConfig,
    check_same_vocab,
    load_model,
    load_tokenizer,
    resolve_model_path,
)

from .conftest import assert_one_line_error, run_cli


def test_local_directory_loads_model_and_tokenizer(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, device="cpu")
    assert model.dtype == torch.float32  # "auto" on CPU
    ids = tokenizer("What is 17 + 25?", return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))
    bf16 = load_model(tiny_model_dir, dtype="bfloat16", device="cpu")
    assert bf16.dtype == torch.bfloat16


def test_loaded_model_passes_through_and_lora_wraps_it(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu")
    assert load_model(model) is model
    total = sum(p.numel() for p in model.parameters())
    wrapped = load_model(model, lora=LoraConfig(r=2, alpha=4))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert 0 < trainable < total / 5


def test_lora_top_layers_adapts_only_those_and_backward_stops_below(tiny_model_dir):
    wrapped = load_model(tiny_model_dir, device="cpu", lora=LoraConfig(r=2, top_layers=1))
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert len(names) == 14 and all(".layers.1." in n for n in names)  # 7 linears x (A, B)
    seen = []
    first = wrapped.base_model.model.model.layers[0]
    first.register_forward_hook(lambda mod, args, out: seen.append(out[0].requires_grad))
    wrapped(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert seen == [False]  # layer 0's output needs no gradient: autograd never enters it
    with pytest.raises(ModelError, match="lora.top_layers=3 but the model has 2 layers"):
        load_model(tiny_model_dir, device="cpu", lora=LoraConfig(r=2, top_layers=3))


def test_missing_directory_and_unknown_names():
    with pytest.raises(ModelError, match="model directory not found: /no/such/model"):
        resolve_model_path("/no/such/model")
    with pytest.raises(
        ModelError,
        match="unknown model 'qwen2.5-coder-0.5b': did you mean 'qwen2.5-coder-0.5b-instruct'",
    ):
        resolve_model_path("qwen2.5-coder-0.5b")
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model_path("/tmp/nothing-here.gguf")
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_directory_without_config_is_explained(tmp_path):
    with pytest.raises(ModelError, match=r"not a Hugging Face model directory \(no config.json\)"):
        resolve_model_path(tmp_path)


def test_same_vocab_passes_and_mismatch_is_specific(tiny_model_dir, other_vocab_dir):
    tok = load_tokenizer(tiny_model_dir)
    check_same_vocab(tok, load_tokenizer(tiny_model_dir))
    other = load_tokenizer(other_vocab_dir)
    with pytest.raises(ModelError) as exc:
        check_same_vocab(tok, other)
    message = str(exc.value)
    assert message.startswith(
        "teacher and student tokenizers differ: "
        f"teacher has {len(tok)} tokens, student {len(other)}"
    )
    assert "ids differ (first: id " in message
    assert message.endswith("pick models of one family")


def _write_gguf(path, n=64):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.weight", np.arange(n, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_checks_catch_garbage_and_truncation(tmp_path):
    good = _write_gguf(tmp_path / "good.gguf", n=4096)
    check_gguf(good)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 1000])
    with pytest.raises(
        ModelError, match="truncated.gguf: (truncated GGUF file|not a readable GGUF)"
    ):
        check_gguf(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(
        ModelError, match="garbage.gguf: not a readable GGUF file .*corrupt or truncated"
    ):
        load_model(garbage)


@pytest.mark.slow
def test_cli_model_errors(tmp_path):
    assert_one_line_error(
        run_cli("models", "prepare", "qwen-7b"), "unknown offline model 'qwen-7b'"
    )
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    out = tmp_path / "run"
    proc = run_cli("quickstart", "--set", f"student.name={bad}", "--set", f"run.output_dir={out}")
    assert_one_line_error(proc, f"{bad}: not a readable GGUF file")
    assert not out.exists()  # validated before anything was written


def test_generate_is_batch_invariant(tiny_model_dir):
    from potstill.teacher.backends import Sampling, complete
    from potstill.teacher.hf_backend import HFBackend

    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir, device="cpu")
    questions = ("What is 2?", "Calculate 5 - 3 - 6 please now.")
    greedy = Sampling(max_new_tokens=8)
    alone = [complete(HFBackend(model, tokenizer, batch_size=1), [q], greedy)[0] for q in questions]
    together = complete(HFBackend(model, tokenizer, batch_size=2), questions, greedy)
    assert [g.text for g in alone] == [g.text for g in together]
    assert all(g.completion_tokens <= 8 for g in together)
    assert {g.finish_reason for g in together} <= {"stop", "length"}
