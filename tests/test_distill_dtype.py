"""A bfloat16 teacher, and a student whose frozen base is bfloat16: the distill step runs, and its
loss moves only by what the bf16 logits carry.

bf16 keeps 8 significand bits (unit roundoff u = 2^-8): a logit of ~20 is stored to ±0.06, and
the teacher's forward adds a few such roundings, so its logits move by ε of a few u times the
largest logit (checked). Two checks follow from that:

- the loss adds no error of its own: with the bf16 teacher it equals, to float32 rounding, the KL
  computed in float32 from that teacher's own (upcast) logits. A softmax in bf16 would fail it;
- against the fp32 teacher it moves, but by no more than logits off by ε_i (row i) can move it.
  Every log p_i moves by at most 2ε_i (the log-sum-exp by at most ε_i), so p'/p ∈ [e^-2ε, e^2ε]
  and, with g_i = e^(2ε_i) − 1 and KL ≤ χ²,

      |KL(p' ‖ q) − KL(p ‖ q)| = |KL(p' ‖ p) + Σ (p' − p)(log p − log q)|
                                ≤ g_i² + g_i Σ p |log p − log q|,

  averaged over the tokens as the loss is (α = 1, T = 1). A worst-case bound (here ~200x the
  move measured); it fails if the option is ignored, which gives the fp32 loss exactly.

Student logits off by ε move CE and KL(p ‖ q) by at most 2ε each, so the mixed loss by 2ε.
"""

import pytest
import torch

from potstill.config.sections import LoraConfig
from potstill.data.examples import build_example
from potstill.models import apply_lora, load_model, load_tokenizer
from potstill.train.kd import (
    DistillHooks,
    Item,
    collate_items,
    load_teacher,
    make_loss_fn,
    online_teacher,
)

from .conftest import build_model, build_tokenizer
from .distill_helpers import config

U = 2.0**-8
"""bf16 unit roundoff: 8 significand bits (7 stored)."""
QUESTIONS = [("What is 17 + 25?", "Answer: 42"), ("Calculate 5 - 3 - 6.", "The answer is -4.")]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_model_dir):
    """(student, teacher, root): the teacher's lm_head scaled so that its distributions are
    peaked like a trained model's (a random one is near uniform: every KL near 0)."""
    root = tmp_path_factory.mktemp("distill-dtype")
    tokenizer = build_tokenizer()
    teacher = build_model(tokenizer, seed=1, hidden=48)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return tiny_model_dir, root / "teacher", root


def _batch(tokenizer):
    items = []
    for question, answer in QUESTIONS:
        messages = ({"role": "user", "content": question},)
        items.append(Item(build_example(tokenizer, messages, answer, 64), question, messages))
    return collate_items(items, tokenizer.pad_token_id), sum(i.example.target_tokens for i in items)


def _logits(model, batch):
    """(N, V) float32 logits at the target positions of the batch."""
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[:, :-1][mask].float()


def _setup(dirs, student_dtype: str, teacher_dtype: str):
    student_dir, teacher_dir, root = dirs
    cfg = config(
        student_dir, teacher_dir, root / "data.jsonl", root / "unused",
        f"student.dtype={student_dtype}", f"teacher.model.dtype={teacher_dtype}",
        "loss.kd_ratio.value=1.0",
    )  # fmt: skip
    tokenizer = load_tokenizer(student_dir)
    torch.manual_seed(0)
    student = load_model(student_dir, dtype=cfg.student.dtype, device="cpu")
    student = apply_lora(student, LoraConfig(r=4, alpha=8, dropout=0.0))
    teacher = load_teacher(cfg, student.get_output_embeddings().weight.shape[0], "cpu")
    return cfg, tokenizer, student, teacher


def _step(cfg, tokenizer, student, teacher, batch, tokens):
    loss_fn = make_loss_fn(cfg, online_teacher(teacher), DistillHooks(cfg, tokenizer))
    loss, _ = loss_fn(student, batch, tokens)
    return loss


def _lora_grads_are_finite_fp32(student, loss) -> bool:
    loss.backward()
    trainable = [p for p in student.parameters() if p.requires_grad]
    return bool(trainable) and all(
        p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
        for p in trainable
    )


def _kl_bound(t32, t16, z):
    """Mean over tokens of the per-token bound on |KL(p' ‖ q) − KL(p ‖ q)| (module docstring)."""
    growth = torch.expm1(2 * (t16 - t32).abs().amax(-1))  # (N,) e^2ε − 1 per token
    log_p = t32.log_softmax(-1)
    spread = (log_p.exp() * (log_p - z.log_softmax(-1)).abs()).sum(-1)  # (N,) Σ p |log p − log q|
    return float((growth**2 + growth * spread).mean())


def test_bf16_teacher_moves_the_loss_only_by_its_logits_rounding(dirs):
    cfg, tokenizer, student, teacher32 = _setup(dirs, "float32", "float32")
    cfg16, _, _, teacher16 = _setup(dirs, "float32", "bfloat16")
    assert {p.dtype for p in teacher16.parameters()} == {torch.bfloat16}  # the option is applied
    batch, tokens = _batch(tokenizer)
    loss32 = _step(cfg, tokenizer, student, teacher32, batch, tokens).detach()
    loss16 = _step(cfg16, tokenizer, student, teacher16, batch, tokens)

    # The loss adds no error of its own: it equals KL against the bf16 teacher's own logits
    # (as the step projects them, upcast), computed in float32 — to float32 rounding.
    mask = batch["labels"][:, 1:] != -100
    seen = online_teacher(teacher16)(batch, mask)
    t16 = (seen.hidden @ seen.weight.T).float()
    t32, z = _logits(teacher32, batch), _logits(student, batch)
    log_p16 = t16.log_softmax(-1)
    reference = (log_p16.exp() * (log_p16 - z.log_softmax(-1))).sum(-1).mean()
    value = float(loss16.detach())
    assert value == pytest.approx(float(reference), rel=1e-5)
    # Against the fp32 teacher it moves, by no more than bf16 logits can move it.
    eps = float((t16 - t32).abs().max())
    assert 0 < eps < 16 * U * float(t32.abs().max())  # bf16-sized, a few roundings deep
    assert float(loss32) > 1.0  # a peaked teacher, not a loss near 0
    assert 0 < abs(value - float(loss32)) <= _kl_bound(t32, t16, z)
    assert _lora_grads_are_finite_fp32(student, loss16)


def test_bf16_student_base_trains_fp32_adapters(dirs):
    cfg, tokenizer, student32, teacher = _setup(dirs, "float32", "float32")
    cfg16, _, student16, _ = _setup(dirs, "bfloat16", "float32")
    frozen = {p.dtype for p in student16.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    batch, tokens = _batch(tokenizer)
    loss32 = _step(cfg, tokenizer, student32, teacher, batch, tokens).detach()
    loss16 = _step(cfg16, tokenizer, student16, teacher, batch, tokens)

    z32, z16 = _logits(student32, batch), _logits(student16, batch)
    # The loss projects the bf16 hidden states itself: one more bf16 rounding of each logit.
    eps = float((z16 - z32).abs().max()) + U * float(z16.abs().max())
    assert 0 < abs(float(loss16.detach()) - float(loss32)) <= 2 * eps
    assert _lora_grads_are_finite_fp32(student16, loss16)
