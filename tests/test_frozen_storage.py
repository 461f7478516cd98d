"""A teacher stored in bf16 and computed in fp32 (`teacher.storage_dtype`): half the bytes of its
linear layers, and outputs equal to those of the fp32 model whose linear weights are rounded to
bf16, i.e. every product and sum still in fp32 (bf16 arithmetic would be ~1e-2 off)."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from potstill.models import load_model
from potstill.train.frozen_storage import NarrowLinear, narrow_storage, stored_bytes
from potstill.train.kd import load_teacher

from .conftest import assert_one_line_error, build_model, build_tokenizer, run_cli
from .distill_helpers import cli_args, config, make_teacher_dir, write_data


def _tied_model(tokenizer):
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(3)
    return Qwen2ForCausalLM(config).eval()


def _rounded(model):
    """The fp32 reference: every weight narrow_storage narrows, rounded to bf16 and back."""
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for m in model.modules():
            if type(m) is torch.nn.Linear and m.weight is not head:
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
    return model


def _linear_weight_elements(model) -> int:
    head = model.get_output_embeddings().weight
    return sum(
        m.weight.numel()
        for m in model.modules()
        if type(m) is torch.nn.Linear and m.weight is not head
    )


@pytest.mark.parametrize("tied", [False, True])
def test_narrow_storage_halves_the_linear_weights_and_keeps_fp32_arithmetic(tied):
    tokenizer = build_tokenizer()
    make = _tied_model if tied else build_model
    wide, reference, narrow = make(tokenizer), _rounded(make(tokenizer)), make(tokenizer)
    before, linear = stored_bytes(narrow), _linear_weight_elements(narrow)
    narrow_storage(narrow, torch.bfloat16, torch.float32)

    assert stored_bytes(narrow) == before - 2 * linear  # 4 -> 2 bytes a narrowed weight
    head = narrow.get_output_embeddings()
    assert head.weight.dtype == torch.float32 and type(head) is torch.nn.Linear
    assert (narrow.model.embed_tokens.weight is head.weight) == tied  # ties survive
    narrowed = [m for m in narrow.modules() if isinstance(m, NarrowLinear)]
    assert len(narrowed) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert {m.weight.dtype for m in narrowed} == {torch.bfloat16}
    assert {m.bias.dtype for m in narrowed if m.bias is not None} == {torch.float32}

    ids = torch.tensor([tokenizer("What is 17 + 25? Answer: 42")["input_ids"]])
    with torch.inference_mode():
        got, want, unrounded = (m(input_ids=ids).logits for m in (narrow, reference, wide))
    assert got.dtype == torch.float32
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale
    assert (unrounded - want).abs().max() > 1e-4 * scale  # the rounding is really there


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("frozen-storage")
    teacher = make_teacher_dir(root / "teacher")
    return tiny_model_dir, teacher, write_data(root / "data.jsonl", n=6), root


@pytest.mark.parametrize("saved", ["float32", "bfloat16"])
def test_load_teacher_stores_bf16_and_computes_fp32(pair, saved):
    """Saved in fp32 (loaded wide, then narrowed) or in bf16 like the kit's models (loaded
    narrow, the rest upcast): either way the fp32 model with bf16-rounded linear weights."""
    student, teacher_dir, data, root = pair
    if saved == "bfloat16":
        teacher_dir = root / "teacher-bf16"
        load_model(pair[1], dtype="bfloat16", device="cpu").save_pretrained(teacher_dir)
        build_tokenizer().save_pretrained(teacher_dir)
    cfg = config(student, teacher_dir, data, root / "out", "teacher.storage_dtype=bfloat16")
    teacher = load_teacher(cfg, 320, "cpu")
    reference = _rounded(load_teacher(config(student, teacher_dir, data, root / "out"), 320, "cpu"))
    assert {p.dtype for p in teacher.lm_head.parameters()} == {torch.float32}
    assert teacher.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.inference_mode():
        got, want = teacher(input_ids=ids).logits, reference(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["teacher.storage_dtype=bfloat16", "teacher.model.dtype=bfloat16"],
            "storage_dtype: bfloat16 storage computes in model.dtype, which is bfloat16 "
            "already; set teacher.model.dtype=float32, or drop teacher.storage_dtype",
        ),
        (
            ["teacher.storage_dtype=bfloat16", "teacher.mode=offline", "teacher.cache=somewhere"],
            "storage_dtype: mode offline loads no teacher; drop teacher.storage_dtype",
        ),
    ],
)
def test_storage_dtype_that_would_do_nothing_is_refused(pair, tmp_path, overrides, message):
    student, teacher_dir, data, _ = pair
    out = tmp_path / "run"
    extra = [a for o in overrides for a in ("--set", o)]
    proc = run_cli(*cli_args(student, teacher_dir, data, out, *extra))
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc, message)
    assert not out.exists()


def test_narrowing_a_model_already_in_its_dtypes_copies_every_tensor():
    """A checkpoint loaded in its own dtype is views of the file's one mmap; a parameter kept as
    such a view keeps the whole mapping, and every page once read, resident beside the copies."""
    model = build_model(build_tokenizer()).to(torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight.data = model.model.norm.weight.float()  # one already fp32
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.float()  # a float buffer
    # held, so that no copy can reuse their memory
    originals = [*model.parameters(), *model.buffers()]
    narrow_storage(model, torch.bfloat16, torch.float32)
    after = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert after.isdisjoint(t.data_ptr() for t in originals)
