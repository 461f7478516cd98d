"""GRPO rollouts on vLLM (`grpo.backend: vllm`): the weights pushed into the engine are the
policy's, LoRA merged under the base model's names and unmerged after; without vLLM the stage
refuses in one line before loading anything; with vLLM (a GPU machine) the engine, once synced,
samples what the policy itself samples."""

from __future__ import annotations

import copy

import pytest
import torch

from potstill.data import write_records
from potstill.rlt.vllm_rollouts import engine_model_path, policy_weights

from .conftest import assert_one_line_error, build_model, build_tokenizer
from .test_rlt_train import QUESTIONS, _train


@pytest.fixture
def lora_policy():
    """A tiny Qwen2 with LoRA on q/v and a trained lm_head, its adapters moved off zero (a
    fresh LoRA's B is 0, which would make merged == base and hide a missed merge)."""
    from peft import LoraConfig, get_peft_model

    base = build_model(build_tokenizer(), hidden=32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["lm_head"])  # fmt: skip
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_lora_weights_reach_the_engine_merged_under_the_base_names(lora_policy):
    expected = copy.deepcopy(lora_policy).merge_and_unload().state_dict()
    ids = torch.tensor([[1, 5, 9, 2]])
    before = lora_policy(ids).logits
    q = "model.layers.0.self_attn.q_proj.weight"
    unmerged = lora_policy.state_dict()[f"base_model.model.{q[:-7]}.base_layer.weight"].clone()
    names = []
    for name, tensor in policy_weights(lora_policy):  # read as the engine reads: at once
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
        names.append(name)
    assert sorted(names) == sorted(expected)  # no lora_A/B, base_layer or original_module
    assert not torch.allclose(expected[q], unmerged)  # the adapter is in what was pushed
    # After the push the policy is unmerged again: same outputs, adapters still training.
    torch.testing.assert_close(lora_policy(ids).logits, before)
    assert not any(getattr(m, "merged", False) for m in lora_policy.modules())


def test_an_abandoned_push_still_unmerges(lora_policy):
    weights = policy_weights(lora_policy)
    next(weights)
    assert any(getattr(m, "merged", False) for m in lora_policy.modules())
    weights.close()  # the engine raised mid-load: the generator is closed
    assert not any(getattr(m, "merged", False) for m in lora_policy.modules())


def test_full_fine_tuning_pushes_every_weight_as_it_is():
    model = build_model(build_tokenizer(), hidden=32)
    pushed = dict(policy_weights(model))  # no merge, so the tensors stay valid after
    state = model.state_dict()
    assert sorted(pushed) == sorted(state)
    assert all(torch.equal(pushed[n], t) for n, t in state.items())


def test_the_engine_starts_from_an_adapters_base(tiny_model_dir, tmp_path, lora_policy):
    lora_policy.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    lora_policy.save_pretrained(tmp_path / "adapter")
    assert engine_model_path(str(tmp_path / "adapter")) == str(tiny_model_dir)
    assert engine_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


def test_vllm_rollouts_without_vllm_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    try:
        import vllm  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        pytest.skip("vLLM is installed here: the refusal cannot happen")
    data = write_records(tmp_path / "q.jsonl", QUESTIONS)
    proc = _train(tiny_model_dir, data, tmp_path / "run", "--set", "grpo.backend=vllm")
    assert_one_line_error(proc, "pip install 'potstill[vllm]'", "backend")
    assert not (tmp_path / "run").exists()


def test_bad_engine_settings_name_the_field(tiny_model_dir, tmp_path):
    data = write_records(tmp_path / "q.jsonl", QUESTIONS)
    proc = _train(tiny_model_dir, data, tmp_path / "run", "--set", "grpo.backend=vllm",
                  "--set", "grpo.vllm.gpu_memory_utilization=1.5")  # fmt: skip
    assert_one_line_error(proc, "gpu_memory_utilization: must be in (0, 1], got 1.5")
    proc = _train(tiny_model_dir, data, tmp_path / "run", "--set", "grpo.backend=sglang")
    assert_one_line_error(proc, "backend", "sglang")


@pytest.mark.slow
def test_a_synced_engine_samples_what_the_policy_samples(tmp_path, lora_policy):
    """On a GPU with vLLM: greedy text from the engine after a sync equals the policy's own."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM's engine needs a GPU")
    from potstill.config.sections import VLLMConfig
    from potstill.rlt.vllm_rollouts import VLLMRollouts
    from potstill.teacher.backends import Request, Sampling
    from potstill.teacher.hf_backend import HFBackend

    tokenizer = build_tokenizer()
    base = tmp_path / "base"
    build_model(tokenizer, hidden=128).save_pretrained(base)  # vLLM takes heads of 32 and up
    tokenizer.save_pretrained(base)
    from peft import LoraConfig, get_peft_model

    from potstill.models import load_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    policy = get_peft_model(load_model(str(base), dtype="float32", device="cuda"), lora)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    engine = VLLMRollouts(str(base), VLLMConfig(gpu_memory_utilization=0.2),
                          dtype="float32", seed=0)  # fmt: skip
    try:
        requests = [Request(key=f"r{i}", messages=[{"role": "user", "content": f"{i} + 1"}])
                    for i in range(4)]  # fmt: skip
        sampling = Sampling(max_new_tokens=8, temperature=0.0)
        engine.sync(policy, version=1)
        got = engine.generate(requests, sampling)
        own = dict(HFBackend(policy, tokenizer, batch_size=4).generate(requests, sampling))
        assert {k: g.token_ids for k, g in got.items()} == {
            r.key: g.token_ids for r, g in own.items()
        }
    finally:
        engine.close()
