"""Chat rendering: messages through a model's chat template, as every backend, trainer and
reward renders them (one function, so the text trained on is the text generated from), and the
end-of-turn a target ends with (what the template writes after an assistant message)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from jinja2 import TemplateError, TemplateSyntaxError

_PROBE = "potstill0end0of0turn0probe"
"""An assistant message whose rendering is searched for: no whitespace (templates `trim`
content) and no special token, so it comes out of any template as it went in."""

_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""tokenizer -> ((chat template, eos), end-of-turn text): rendered once per template, not once
per example (a template set later, as tests and `load_tokenizer` do, renders again)."""


def render_chat(tokenizer, messages: Sequence[dict], prefill: str = "") -> str:
    """`messages` through the tokenizer's chat template, ready for the assistant turn, then
    `prefill` (the start of the assistant's answer, if any). A template that refuses a system
    turn (Gemma's, Mistral's raise on it) gets the system prompt folded into the first user
    turn instead, as those models were trained to see it."""
    messages = list(messages)
    if getattr(tokenizer, "chat_template", None):
        text = _apply_template(tokenizer, messages)
    else:  # a base model: plain text, with the BOS a chat template would have added
        system = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
        user = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
        text = f"{tokenizer.bos_token or ''}{system}Question: {user}\nAnswer:"
    return text + prefill


def _apply_template(tokenizer, messages: list[dict]) -> str:
    def apply(msgs):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    try:
        return apply(messages)
    except TemplateSyntaxError:
        raise  # a broken template, not a refusal: folding would not help
    except TemplateError:
        if not any(m["role"] == "system" for m in messages):
            raise  # refused for another reason (e.g. roles not alternating): the caller's error
    # Outside the except block, so a second refusal does not chain onto the first.
    return apply(fold_system(messages))


def fold_system(messages: Sequence[dict]) -> list[dict]:
    """The system turns' text prepended to the first user turn, separated by a blank line: what
    Gemma 3's template does itself (`first_user_prefix`) and what Gemma 2's and Mistral's model
    cards say to do. Without a user turn the system text becomes one."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if first_user is None:
        return [{"role": "user", "content": system}, *rest]
    first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest


def end_of_turn(tokenizer) -> str:
    """The text a target ends with: what the chat template writes right after an assistant
    message, up to and including its first special token (`<|im_end|>` for ChatML,
    `<end_of_turn>` for Gemma, `<|eot_id|>` for Llama 3, `</s>` for Mistral).

    What the template writes after that token (ChatML's and Gemma's newline, Phi-3's trailing
    eos) is not part of the target: generation stops on the end-of-turn token (the `hf` backend
    stops on it, `HFBackend.eos_ids`), so nothing after it is ever sampled, and a student trained
    on it would spend loss on a token it never emits. Without a chat template, or when the
    template marks the end of a turn with no special token, the eos token (as before)."""
    if tokenizer is None:  # an engine that keeps its tokenizer to itself: nothing to add
        return ""
    template = getattr(tokenizer, "chat_template", None)
    eos = tokenizer.eos_token or ""
    key = (template, eos)
    try:
        cached = _END_OF_TURN.get(tokenizer)
    except TypeError:  # not weak-referenceable: render every time
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    text = _end_of_turn(tokenizer, eos) if template else eos
    try:
        _END_OF_TURN[tokenizer] = (key, text)
    except TypeError:
        pass
    return text


def _end_of_turn(tokenizer, eos: str) -> str:
    conversation = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _PROBE}]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    except TemplateError:  # a template that takes no finished assistant turn
        return eos
    if _PROBE not in rendered:
        return eos
    after = rendered.rsplit(_PROBE, 1)[1]
    hits = [(after.find(t), -len(t), t) for t in _special_tokens(tokenizer) if t in after]
    if not hits:
        return eos
    start, _, token = min(hits)  # the first special token; of two starting there, the longer
    return after[: start + len(token)]


def _special_tokens(tokenizer) -> set[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(t.content for t in decoder.values() if getattr(t, "special", False))
    return {t for t in tokens if t}


def end_of_turn_ids(tokenizer) -> list[int]:
    """`end_of_turn` as token ids, tokenised on its own (so the target's boundary is exact);
    empty for a tokenizer with neither a chat template nor an eos token."""
    text = end_of_turn(tokenizer)
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def stop_token_id(tokenizer) -> int | None:
    """The token generation stops on after a turn: the last of `end_of_turn_ids` (the special
    token itself), or the eos token when the end-of-turn holds none."""
    if tokenizer is None:
        return None
    ids = end_of_turn_ids(tokenizer)
    return ids[-1] if ids else tokenizer.eos_token_id
