"""`potstill doctor`: the pair report from tokenizers and config.json, on the tiny fixtures (one
vocabulary, two vocabularies), offline chat templates of other families, the closed-form
parameter count against real models' parameters, and the CLI's text, JSON and refusals."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from potstill.cli.app import main
from potstill.doctor import (
    SYSTEM_ACCEPTED,
    SYSTEM_REFUSED,
    compare,
    diagnose,
    estimate_parameters,
    model_facts,
    report_lines,
)

from .chat_templates import family_tokenizer
from .conftest import CORPUS, assert_one_line_error, build_model, build_tokenizer, run_cli

SAME_VOCAB_MODES = (
    "logit KD, online teacher",
    "logit KD, offline cache",
    "on-policy KD",
    "RLT (teacher scored under the student)",
)


def applying(report) -> dict[str, bool]:
    return {mode.name: mode.applies for mode in report.modes}


def test_one_vocabulary_every_mode_applies(tiny_model_dir):
    report = diagnose(str(tiny_model_dir), str(tiny_model_dir))
    tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert report.same_vocab and report.vocab_difference is None
    assert report.matching_student_tokens == report.student_vocab == tokens == 320
    modes = applying(report)
    assert all(modes[name] for name in SAME_VOCAB_MODES)
    assert (modes["cross-tokenizer KD"], modes["sequence-level"]) == (False, True)
    assert report.chat_notes == []
    assert report.context_note == "context: 512 tokens each"
    assert report.student.sizes.vocab_rows == 320 and report.student.sizes.context == 512
    assert report.verdict == "same vocabulary — every distill mode applies"
    lines = report_lines(report)
    assert lines[-1] == "verdict: same vocabulary — every distill mode applies"
    overlap = (
        "  exact-string overlap: 320 of 320 student tokens (100.0%) are spelled as a teacher token"
    )
    assert overlap in lines


def test_two_vocabularies_report_the_exact_overlap(tiny_model_dir, other_vocab_dir):
    report = diagnose(str(tiny_model_dir), str(other_vocab_dir))
    teacher_vocab = AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    student_vocab = AutoTokenizer.from_pretrained(other_vocab_dir).get_vocab()
    shared = len(teacher_vocab.keys() & student_vocab.keys())  # one id per string in a BPE vocab
    assert report.student_vocab == len(student_vocab) == 300
    assert report.matching_student_tokens == shared == 292  # 8 "zebra yak" merges do not match
    assert not report.same_vocab
    assert "teacher has 320 tokens, student 300" in report.vocab_difference
    modes = applying(report)
    assert not any(modes[name] for name in SAME_VOCAB_MODES)
    assert modes["cross-tokenizer KD"] and modes["sequence-level"]
    assert report.verdict == (
        f"different vocabularies ({shared} of 300 student tokens match) — use "
        "loss.cross_tokenizer online, or sequence-level distillation"
    )
    line = next(x for x in report_lines(report) if "exact-string overlap" in x)
    assert f"{shared} of 300 student tokens ({shared / 300:.1%})" in line


def test_the_parameter_estimate_is_the_real_count_of_the_tiny_models():
    tokenizer = build_tokenizer()
    qwen2 = build_model(tokenizer)  # untied, q/k/v biases
    assert estimate_parameters(qwen2.config) == sum(p.numel() for p in qwen2.parameters())
    llama_config = LlamaConfig(
        vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=128,
    )  # fmt: skip
    llama = LlamaForCausalLM(llama_config)  # tied, every bias, head_dim * heads != hidden
    real = sum(p.numel() for p in llama.parameters())  # a tied matrix counts once
    assert estimate_parameters(llama_config) == real
    untied = LlamaConfig(**{**llama_config.to_dict(), "tie_word_embeddings": False})
    assert estimate_parameters(untied) == real + 300 * 48


def test_the_sizes_come_from_config_json(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    facts = model_facts("tiny", build_tokenizer(), config)
    real = sum(p.numel() for p in build_model(build_tokenizer()).parameters())
    assert facts.sizes.parameters == real
    assert (facts.sizes.layers, facts.sizes.hidden, facts.sizes.intermediate) == (2, 32, 64)
    assert facts.sizes.tied_embeddings is False


def test_a_template_without_a_system_role_is_named(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    chatml, gemma = build_tokenizer(), family_tokenizer("gemma2")
    teacher, student = model_facts("chatml", chatml, config), model_facts("gemma", gemma, config)
    assert teacher.chat.system_role == SYSTEM_ACCEPTED
    assert student.chat.system_role == SYSTEM_REFUSED
    assert (student.chat.end_of_turn, student.chat.template_writes_bos) == ("<end_of_turn>", True)
    report = compare(teacher, student, chatml, gemma)
    assert report.chat_notes == [
        "student: no system role: potstill folds the system prompt into the first user turn",
        "end of turn: teacher '<|im_end|>', student '<end_of_turn>' (each target ends with its "
        "own model's)",
        "BOS: teacher none added, student '<bos>' from the template",
    ]
    assert not report.same_vocab  # gemma's four added tokens


def test_a_tokenizer_without_a_chat_template_is_named(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    base = build_tokenizer(corpus=CORPUS)
    base.chat_template = None
    teacher = model_facts("chat", build_tokenizer(), config)
    student = model_facts("base", base, config)
    assert (student.chat.has_template, student.chat.system_role) == (False, "no chat template")
    report = compare(teacher, student, build_tokenizer(), base)
    assert report.same_vocab  # a template is not part of the vocabulary
    assert report.chat_notes == [
        "chat template: only the teacher has one; the student's prompts are plain "
        "'Question: … Answer:' text"
    ]


def test_the_cli_prints_the_report_as_json(tiny_model_dir, other_vocab_dir, tmp_path):
    proc = run_cli("doctor", str(tiny_model_dir), str(other_vocab_dir), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["same_vocab"] is False
    assert report["student_vocab"] == 300
    assert report["teacher"]["tokens"] == 320
    assert report["teacher"]["sizes"]["parameters"] == sum(
        p.numel() for p in build_model(build_tokenizer()).parameters()
    )
    assert report["student"]["chat"]["end_of_turn"] == "<|im_end|>"
    assert [m["name"] for m in report["modes"] if m["applies"]] == [
        "cross-tokenizer KD",
        "sequence-level",
    ]
    assert report["verdict"].startswith(
        f"different vocabularies ({report['matching_student_tokens']} of 300"
    )


@pytest.fixture
def keep_sigterm():
    """main() makes SIGTERM stop like Ctrl-C; give pytest its own handler back."""
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def test_bad_models_are_one_line_exit_2(tiny_model_dir, tmp_path, capsys, keep_sigterm):
    cases = {
        str(tmp_path / "missing"): "model directory not found",
        str(tmp_path): "is not a Hugging Face model directory (no config.json)",
        "qwen2.5-coder-1.5b-instruc": "did you mean 'qwen2.5-coder-1.5b-instruct'?",
    }
    for spec, fragment in cases.items():
        code = main(["doctor", str(tiny_model_dir), spec])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert (code, len(lines)) == (2, 1), (spec, lines)
        assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    proc = run_cli("doctor", str(tmp_path / "missing"), str(tiny_model_dir), cwd=tmp_path)
    assert_one_line_error(proc, "model directory not found")


@pytest.mark.slow
def test_qwen_and_smollm2_share_39237_of_49152_tokens():
    """Tokenizers and config.json of two kit models (a download on a fresh machine)."""
    report = diagnose("qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct")
    assert (report.matching_student_tokens, report.student_vocab) == (39_237, 49_152)
    assert report.verdict == (
        "different vocabularies (39,237 of 49,152 student tokens match) — use "
        "loss.cross_tokenizer online, or sequence-level distillation"
    )
    assert report.student.chat.end_of_turn == report.teacher.chat.end_of_turn == "<|im_end|>"
    if report.student.sizes is not None:  # the kit folder is prepared, not a tokenizer alone
        assert report.student.sizes.parameters == 134_515_008  # SmolLM2-135M's safetensors
        assert report.context_note.endswith("must fit in 8,192")
