"""`potstill distill` across vocabularies (loss.cross_tokenizer): it trains, its soft loss is the
aligned ULD computed by hand, with one tokenizer the hybrid is the same-vocabulary loss, resume
is exact, and bad configs are refused in one line."""

import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from potstill.config import load_config
from potstill.data import write_records
from potstill.data.alignment import align_offsets, target_positions
from potstill.data.chat import render_chat
from potstill.data.examples import build_example
from potstill.errors import ConfigError
from potstill.losses.cross_vocab import uld
from potstill.stages.distill import DistillConfig, run_distill
from potstill.train.cross_tokenizer import teacher_view
from potstill.train.loop import read_metrics

from .conftest import assert_one_line_error, run_cli
from .distill_helpers import cli_args, config, distill_overrides, make_teacher_dir

QUESTION, ANSWER = "What is 2 + 2? Say zebra.", "Answer: zebra 4"
"""`zebra` is one piece of the other vocabulary's corpus, several of the student's: a many:1
span, so some student positions have no partner."""
ULD = "loss.cross_tokenizer={loss: uld}"
MODELS = Path.home() / ".cache" / "potstill" / "models"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # One record four times: every micro-batch is the same batch, whatever the order.
    rows = [{"id": f"r{i}", "question": QUESTION, "completion": ANSWER} for i in range(4)]
    return write_records(tmp_path_factory.mktemp("xtok") / "data.jsonl", rows)


def _run(cfg, **kw):
    return run_distill(cfg, Console(quiet=True), **kw)


def _metrics(out):
    return read_metrics(out / "metrics.jsonl")


def _rendered(tokenizer):
    """(ids, prompt length, answer offsets) of the record, built here without potstill."""
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(ANSWER, add_special_tokens=False, return_offsets_mapping=True)
    end = tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = prompt_ids + answer["input_ids"] + end
    return ids, len(prompt_ids), [tuple(o) for o in answer["offset_mapping"]]


def test_trains_across_vocabularies_and_the_loss_goes_down(
    tiny_model_dir, other_vocab_dir, data, tmp_path
):
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, other_vocab_dir, data, out, ULD, "train.max_steps=8")
    assert _run(cfg)["step"] == 8
    metrics = _metrics(out)
    assert sorted(metrics) == list(range(1, 9))
    losses = [m["loss"] for m in metrics.values()]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False))
    # The many:1 span leaves some target positions without a partner, and none of them twice.
    assert 0.5 < metrics[1]["aligned"] < 1.0
    assert (out / "final" / "adapter_config.json").is_file()


@pytest.mark.parametrize("loss", ["uld", "hybrid"])
def test_the_soft_loss_goes_down_with_the_teacher_alone(
    tiny_model_dir, other_vocab_dir, data, tmp_path, loss
):
    out = tmp_path / "run"
    overrides = [
        f"loss.cross_tokenizer={{loss: {loss}}}",
        "loss.kd_ratio.value=1.0",
        "train.lr=0.05",
        "train.max_steps=8",
    ]
    _run(config(tiny_model_dir, other_vocab_dir, data, out, *overrides))
    soft = [m["soft"] for m in _metrics(out).values()]
    assert soft[-1] < 0.95 * soft[0]  # measured: ULD -8 %, hybrid -11 % in 8 steps


def test_soft_loss_at_step_one_is_the_aligned_uld_computed_by_hand(
    tiny_model_dir, other_vocab_dir, data, tmp_path
):
    from potstill.models import load_model, load_tokenizer

    out = tmp_path / "run"
    overrides = [ULD, "train.max_steps=1", "loss.kd_ratio.value=0.3"]
    _run(config(tiny_model_dir, other_vocab_dir, data, out, *overrides))
    logged = _metrics(out)[1]

    s_tok, t_tok = load_tokenizer(tiny_model_dir), load_tokenizer(other_vocab_dir)
    s_ids, s_start, s_offsets = _rendered(s_tok)
    t_ids, t_start, t_offsets = _rendered(t_tok)
    s_spans, t_spans = target_positions(align_offsets(t_offsets, s_offsets, len(ANSWER)))
    # Both have read the whole prompt at its last token; then the last token of every span.
    s_pos = [s_start - 1] + [s_start + i for i in s_spans]
    t_pos = [t_start - 1] + [t_start + j for j in t_spans]
    with torch.no_grad():  # LoRA's B starts at zero: step 1 sees the base student
        s_logits = load_model(tiny_model_dir, device="cpu")(torch.tensor([s_ids])).logits[0]
        t_logits = load_model(other_vocab_dir, device="cpu")(torch.tensor([t_ids])).logits[0]
    targets = torch.tensor(s_ids[s_start:])
    n_targets = len(targets)
    soft = uld(s_logits[s_pos], t_logits[t_pos]).sum().item() / n_targets
    ce = torch.nn.functional.cross_entropy(s_logits[s_start - 1 : -1], targets).item()
    assert len(s_pos) < n_targets  # some positions unpaired: the test covers the mask
    assert logged["aligned"] == pytest.approx(len(s_pos) / n_targets, abs=1e-9)
    assert logged["soft"] == pytest.approx(soft, abs=1e-5)
    assert logged["ce"] == pytest.approx(ce, abs=1e-5)
    assert logged["loss"] == pytest.approx(0.7 * ce + 0.3 * soft, abs=1e-5)


def test_hybrid_with_one_tokenizer_is_the_same_vocabulary_loss(tiny_model_dir, data, tmp_path):
    # A teacher with the student's tokenizer and other weights: with the identity match the
    # hybrid is forward KL on every target position, so whole runs must agree.
    teacher = make_teacher_dir(tmp_path / "teacher")
    steps = ["train.max_steps=3", "loss.kd_ratio.value=0.6", "loss.temperature=2.0"]
    hybrid = "loss.cross_tokenizer={loss: hybrid, unmatched_weight: 1.0}"
    _run(config(tiny_model_dir, teacher, data, tmp_path / "cross", *steps, hybrid))
    _run(config(tiny_model_dir, teacher, data, tmp_path / "same", *steps))
    cross, same = _metrics(tmp_path / "cross"), _metrics(tmp_path / "same")
    assert same[1]["soft"] > 1e-3  # the two models disagree: the comparison means something
    for step in (1, 2, 3):
        assert cross[step]["aligned"] == pytest.approx(1.0)
        for key in ("loss", "ce", "soft", "kd_ratio", "grad_norm"):
            assert cross[step][key] == pytest.approx(same[step][key], rel=1e-4, abs=1e-6)


@pytest.mark.slow  # a resume chain: three runs
def test_resume_after_a_stop_gives_the_metrics_of_an_uninterrupted_run(
    tiny_model_dir, other_vocab_dir, data, tmp_path
):
    extra = [
        "loss.cross_tokenizer={loss: hybrid, top_k: 16, matched_weight: 0.5}",
        "loss.kd_ratio.strategy=balance",
        "train.max_steps=4",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(config(tiny_model_dir, other_vocab_dir, data, full, *extra))
    _run(config(tiny_model_dir, other_vocab_dir, data, cut, *extra))
    # What a run killed after its step-2 checkpoint leaves (later metrics are rewritten).
    shutil.rmtree(cut / "checkpoints" / "step-000004")
    shutil.rmtree(cut / "final")
    _run(config(tiny_model_dir, other_vocab_dir, data, cut, *extra), resume=True)
    expected, resumed = _metrics(full), _metrics(cut)
    for step in (3, 4):
        for key in ("loss", "ce", "soft", "kd_ratio", "aligned"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-6)
    assert expected[4]["kd_ratio"] != pytest.approx(expected[1]["kd_ratio"])  # balance moved


def test_other_vocabulary_without_cross_tokenizer_is_refused_with_the_hint(
    tiny_model_dir, other_vocab_dir, data, tmp_path
):
    proc = run_cli(*cli_args(tiny_model_dir, other_vocab_dir, data, tmp_path / "run"))
    assert_one_line_error(proc, "teacher and student tokenizers differ", "loss.cross_tokenizer")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("loss.cross_tokenizer={loss: uld, top_k: 0}", "loss.cross_tokenizer.top_k"),
        ("loss.cross_tokenizer={loss: dtw}", "loss.cross_tokenizer.loss"),
    ],
)
def test_bad_cross_tokenizer_values_fail_in_one_line(
    tiny_model_dir, other_vocab_dir, data, tmp_path, setting, fragment
):
    args = cli_args(tiny_model_dir, other_vocab_dir, data, tmp_path / "run", "--set", setting)
    assert_one_line_error(run_cli(*args), fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        (["loss.cross_tokenizer={matched_weight: -1}"], "matched_weight: must be >= 0"),
        (["loss.cross_tokenizer={matched_weight: 0, unmatched_weight: 0}"], "both 0"),
        ([ULD, "teacher.mode=on_policy"], "on-policy samples are not re-tokenised"),
        ([ULD, "teacher.mode=offline"], "needs teacher.cache"),  # allowed: it only needs a cache
        ([ULD, "loss.kd_ratio.strategy=teacher_confidence"], "teacher_confidence"),
    ],
)
def test_config_checks(tmp_path, settings, fragment):
    overrides = distill_overrides("s", "t", tmp_path / "d.jsonl", tmp_path / "o", *settings)
    with pytest.raises(ConfigError, match=fragment):
        load_config(DistillConfig, overrides=overrides)


@pytest.mark.skipif(
    not (MODELS / "qwen2.5-coder-1.5b-instruct" / "tokenizer.json").is_file()
    or not (MODELS / "smollm2-135m-instruct" / "tokenizer.json").is_file(),
    reason="the offline kit's Qwen2.5-Coder and SmolLM2 tokenizers are not on this machine",
)
@pytest.mark.parametrize("max_len", [512, 60])
def test_pairs_of_real_tokenizers_have_read_the_same_answer_text(max_len):
    from potstill.models import load_tokenizer

    teacher = load_tokenizer(str(MODELS / "qwen2.5-coder-1.5b-instruct"))
    student = load_tokenizer(str(MODELS / "smollm2-135m-instruct"))
    messages = ({"role": "user", "content": "Write fib."},)
    answer = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # Ünïcødé ✓"
    example = build_example(student, messages, answer, max_len)
    view = teacher_view(example, messages, answer, student, teacher, max_len)
    s_start = next(i for i, label in enumerate(example.labels) if label != -100)
    t_prompt = render_chat(teacher, messages)
    t_start = len(teacher(t_prompt, add_special_tokens=False)["input_ids"])
    assert t_prompt != render_chat(student, messages)  # the templates differ (system prompts)
    assert view.input_ids[:t_start] == teacher(t_prompt, add_special_tokens=False)["input_ids"]
    pairs = list(zip(view.student_positions, view.teacher_positions, strict=True))
    assert pairs[0] == (s_start - 1, t_start - 1)
    assert 10 < len(pairs) < example.target_tokens
    for s, t in pairs:
        assert s + 1 < len(example.input_ids) and t < len(view.input_ids)
        # Both have read the same characters of the answer at a paired position.
        read_s = student.decode(example.input_ids[s_start : s + 1])
        read_t = teacher.decode(view.input_ids[t_start : t + 1])
        assert read_s == read_t
    if max_len < 100:
        assert len(example.input_ids) == max_len  # truncated inside the answer
