"""Targets end with the chat template's end-of-turn (not the tokenizer's eos), generation stops
on it, and a template that refuses a system turn gets the system prompt in the first user turn:
the real templates of four families (`tests/chat_templates.py`) on the tiny tokenizer."""

from __future__ import annotations

import pytest
import torch
from jinja2 import TemplateError

from potstill.data import write_records
from potstill.data.chat import end_of_turn, render_chat, stop_token_id
from potstill.data.examples import build_example
from potstill.losses.reduce import IGNORE_INDEX
from potstill.teacher.backends import Request, Sampling
from potstill.teacher.hf_backend import HFBackend

from .chat_templates import FAMILIES, family_tokenizer
from .conftest import build_model, build_tokenizer, run_cli

SYSTEM, USER = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_target_ends_with_the_family_end_of_turn_token(family):
    tokenizer = family_tokenizer(family)
    end = FAMILIES[family][-1]
    example = build_example(tokenizer, (SYSTEM, USER), "4", 64)
    target = [label for label in example.labels if label != IGNORE_INDEX]
    assert target == [*ids(tokenizer, "4"), tokenizer.convert_tokens_to_ids(end)]
    assert example.input_ids[-len(target) :] == target
    assert tokenizer.decode(example.input_ids).endswith(f"4{end}")
    if end != tokenizer.eos_token:  # all but Mistral, whose turns end with the eos itself
        assert tokenizer.eos_token_id not in example.input_ids


def test_chatml_renders_as_before_and_only_the_suffix_changed():
    """Qwen2.5's real template with a base model's eos (`<|endoftext|>`): the same prompt text
    as the template renders by itself, then `4<|im_end|>`, not `4<|endoftext|>`."""
    tokenizer = family_tokenizer("qwen2.5")
    example = build_example(tokenizer, (SYSTEM, USER), "4", 64)
    assert tokenizer.decode(example.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>"
    )
    prompt = tokenizer.apply_chat_template(
        [SYSTEM, USER], tokenize=False, add_generation_prompt=True
    )
    assert example.input_ids == ids(tokenizer, prompt) + ids(tokenizer, "4<|im_end|>")


def test_an_eos_that_is_the_end_of_turn_gives_the_ids_of_before():
    """The fixture every other test trains on (eos `<|im_end|>`): prompt + target + eos, as the
    trainers and the teacher cache built them before, so caches made then still line up."""
    tokenizer = build_tokenizer()
    example = build_example(tokenizer, (SYSTEM, USER), "Answer: 42", 64)
    prompt = tokenizer.apply_chat_template(
        [SYSTEM, USER], tokenize=False, add_generation_prompt=True
    )
    before = [*ids(tokenizer, prompt), *ids(tokenizer, "Answer: 42"), tokenizer.eos_token_id]
    assert example.input_ids == before


def test_gemma_gets_the_system_prompt_once_in_the_first_user_turn():
    tokenizer = family_tokenizer("gemma2")
    with pytest.raises(TemplateError, match="System role not supported"):  # the template alone
        tokenizer.apply_chat_template([SYSTEM, USER], tokenize=False, add_generation_prompt=True)
    text = render_chat(tokenizer, [SYSTEM, USER])
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert text.count("Be brief.") == 1
    example = build_example(tokenizer, (SYSTEM, USER), "4", 64)
    assert tokenizer.decode(example.input_ids) == f"{text}4<end_of_turn>"


def test_mistral_folds_the_system_prompt_and_a_system_turn_alone_becomes_the_user_turn():
    tokenizer = family_tokenizer("mistral")
    assert render_chat(tokenizer, [SYSTEM, USER]) == "<s>[INST] Be brief.\n\n2+2? [/INST]"
    assert render_chat(tokenizer, [SYSTEM]) == "<s>[INST] Be brief. [/INST]"


def test_a_refusal_folding_cannot_fix_is_the_template_s_own_error():
    """Two user turns in a row break Gemma's alternation with or without a system turn: the
    template's error comes through (`serve` answers it with a 400), not the system refusal."""
    tokenizer = family_tokenizer("gemma2")
    for messages in ([USER, USER], [SYSTEM, USER, USER]):
        with pytest.raises(TemplateError, match="must alternate") as info:
            render_chat(tokenizer, messages)
        assert info.value.__context__ is None  # not chained onto the system refusal


@pytest.mark.parametrize(
    ("assistant_turn", "expected"),
    [
        ("{{ m['content'] }}<|end|>\n{{ eos_token }}", "<|end|>"),  # Phi-3: the first special
        ("{{ m['content'] }} {{ eos_token }}", " <eos>"),  # Llama 2: what precedes it, too
        ("{{ m['content'] }}\n\n", "<eos>"),  # no special token ends the turn: the eos
    ],
)
def test_the_end_of_turn_is_up_to_the_first_special_token(assistant_turn, expected):
    tokenizer = family_tokenizer("gemma2")
    tokenizer.add_tokens(["<|end|>"], special_tokens=True)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}" + assistant_turn + "{% else %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    assert end_of_turn(tokenizer) == expected
    tokenizer.chat_template = None  # a base model: the eos, as before
    assert end_of_turn(tokenizer) == "<eos>"


def test_the_hf_backend_stops_on_the_end_of_turn_a_base_config_does_not_name():
    """A Gemma-templated student whose generation config names only `<eos>` (a base model
    fine-tuned on `<end_of_turn>` targets) and whose head makes `<end_of_turn>` its greedy
    choice: the sample stops there, empty, instead of repeating it to max_new_tokens."""
    tokenizer = family_tokenizer("gemma2")
    model = build_model(tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    prompt = ids(tokenizer, render_chat(tokenizer, [USER]))
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
        model.lm_head.weight.zero_()
        model.lm_head.weight[eot] = 10 * hidden / hidden.square().sum()  # logit 10, the rest 0
    backend = HFBackend(model, tokenizer, batch_size=1)
    assert stop_token_id(tokenizer) == eot and eot in backend.eos_ids
    ((_, generation),) = backend.generate(
        [Request(key="q", messages=(USER,), seed=0)], Sampling(max_new_tokens=5, temperature=0)
    )
    assert (generation.finish_reason, generation.completion_tokens) == ("stop", 0)


def test_sft_with_a_system_prompt_on_a_template_that_refuses_one(tmp_path):
    """The CLI end to end on a Gemma-templated model with the default system prompt: it trains
    (before, the template's refusal was a traceback)."""
    tokenizer = family_tokenizer("gemma2")
    model_dir = tmp_path / "tiny-gemma-template"
    build_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"id": f"r{i}", "question": f"{i} + {i}?", "completion": f"{2 * i}"} for i in range(4)]
    data = write_records(tmp_path / "kept.jsonl", rows)
    out = tmp_path / "run"
    proc = run_cli(
        "sft", "--set", f"model.name={model_dir}", "--set", f"data.source={data}",
        "--set", "data.system_prompt=step_by_step", "--set", "train.max_steps=1",
        "--set", "run.log_with=[]", "--set", f"run.output_dir={out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "final").is_dir()
