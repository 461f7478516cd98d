"""Training examples from records: the prompt through the chat template (masked), the target
after it, packing and collation. Every trainer and the teacher cache build examples here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from potstill.data.chat import end_of_turn_ids, render_chat
from potstill.errors import DataError, PotstillError
from potstill.losses.reduce import IGNORE_INDEX
from potstill.prompts import load_prompt


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    """IGNORE_INDEX on prompt tokens; the token itself on target tokens."""
    position_ids: list[int]

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def build_example(
    tokenizer, prompt_messages: tuple[dict, ...], target: str, max_len: int, *,
    prefill: str = "", end_turn: bool = True,
) -> Example | None:  # fmt: skip
    """Tokenise prompt and target apart (so the boundary is exact), truncate to `max_len`;
    None when no target token survives the truncation. `prefill` starts the assistant turn as
    part of the prompt (no loss on it). The target ends with the chat template's end-of-turn
    (`data.chat.end_of_turn`: `<end_of_turn>` for Gemma, not the tokenizer's eos), so the student
    learns to stop where generation stops; `end_turn=False` leaves it off (a sample cut by a
    token limit did not end its turn)."""
    prompt = render_chat(tokenizer, prompt_messages, prefill)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if end_turn:
        target_ids = [*target_ids, *end_of_turn_ids(tokenizer)]
    ids = (prompt_ids + target_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(ids, labels, list(range(len(ids))))


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """First-fit-decreasing bins of up to `max_len` tokens; positions restart per example.
    Deterministic: the same examples give the same bins."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        slot = next((i for i, r in enumerate(room) if r >= len(ex.input_ids)), None)
        if slot is None:
            bins.append([ex])
            room.append(max_len - len(ex.input_ids))
        else:
            bins[slot].append(ex)
            room[slot] -= len(ex.input_ids)
    return [
        Example(
            [t for e in b for t in e.input_ids],
            [t for e in b for t in e.labels],
            [t for e in b for t in e.position_ids],
        )
        for b in bins
    ]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding is masked out and carries no label."""
    width = max(len(e.input_ids) for e in examples)

    def padded(rows, fill):
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows])

    return {
        "input_ids": padded([e.input_ids for e in examples], pad_id),
        "labels": padded([e.labels for e in examples], IGNORE_INDEX),
        "position_ids": padded([e.position_ids for e in examples], 0),
        "attention_mask": padded([[1] * len(e.input_ids) for e in examples], 0),
    }


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def record_examples(records: list[dict], data, tokenizer, max_len: int, *, where: str):
    """(record, prompt messages, Example or None) per record, built the way every trainer and
    the teacher cache build them: system prompt + the prompt field through the chat template,
    then the target field. None when no target token fits in `max_len`. `data` is a section with
    prompt_field, target_field and system_prompt (SFTDataConfig)."""
    system = load_prompt(data.system_prompt) if data.system_prompt else None
    for record in records:
        check_prompt_provenance(record, data, system, where)
        for field_name in (data.prompt_field, data.target_field):
            if not isinstance(record.get(field_name), str):
                which = "prompt" if field_name == data.prompt_field else "target"
                raise DataError(
                    f"{where}: record '{record['id']}' has no text field '{field_name}'; set "
                    f"data.{which}_field to a field the records have, or curate generated "
                    "samples first"
                )
        messages = ({"role": "user", "content": record[data.prompt_field]},)
        if system:
            messages = ({"role": "system", "content": system}, *messages)
        target = record[data.target_field]
        yield record, messages, build_example(tokenizer, messages, target, max_len)


def check_prompt_provenance(record: dict, data, system: str | None, where: str) -> None:
    """Refuse to train on a teacher trace under another system prompt than it was generated
    with: `generate` stores its prompt in the record's `teacher` provenance, and a student
    trained on (other prompt -> this answer) learns the wrong mapping, silently. Only traces
    (the `completion` field) carry that provenance; other targets are not checked."""
    provenance = record.get("teacher")
    if data.target_field != "completion" or not isinstance(provenance, dict):
        return
    if "system_prompt" not in provenance:
        return
    generated_with = provenance["system_prompt"]
    if _prompt_text(generated_with) == system:
        return
    hint = f"data.system_prompt={generated_with}" if generated_with else "data.system_prompt=null"
    raise DataError(
        f"{where}: record '{record.get('id')}' was generated with system prompt "
        f"{generated_with!r} but data.system_prompt is {data.system_prompt!r}; set {hint} to "
        "train with the prompt the traces were generated with"
    )


def _prompt_text(name: str | None) -> str | None:
    """The text of a prompt named in provenance; the name itself when this machine lacks it."""
    if not name:
        return None
    try:
        return load_prompt(name)
    except PotstillError:
        return name


def examples_line(counts: dict) -> str:
    """What a trainer prints once its examples are built (rich markup)."""
    return (
        f"[bold]{counts['sequences']}[/] sequences, {counts['target_tokens']:,} target tokens "
        f"({counts['skipped_no_target_tokens']} records skipped: no target token fits)"
    )
