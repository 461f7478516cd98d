"""Chat rendering: messages through a model's chat template, as every backend, trainer and
reward renders them (one function, so the text trained on is the text generated from)."""

from __future__ import annotations

from collections.abc import Sequence


def render_chat(tokenizer, messages: Sequence[dict], prefill: str = "") -> str:
    """`messages` through the tokenizer's chat template, ready for the assistant turn, then
    `prefill` (the start of the assistant's answer, if any)."""
    messages = list(messages)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model: plain text, with the BOS a chat template would have added
        system = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
        user = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
        text = f"{tokenizer.bos_token or ''}{system}Question: {user}\nAnswer:"
    return text + prefill
