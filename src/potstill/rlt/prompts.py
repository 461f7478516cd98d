"""The two RLT contexts (Sakana AI, "Reinforcement Learning Teachers of Test Time Scaling",
arXiv 2506.08388), rendered through each model's own chat template.

The teacher sees the question *and* the solution and writes an explanation:

    system: rlt_teacher prompt | user: question |
    assistant: {solution_start}S{solution_end}\\n\\n{explanation_start}\\n\\n E {explanation_end}

The student sees the question and the explanation as its own thought, then the solution:

    system: rlt_student prompt | user: question |
    assistant: {thought_start}E{thought_end}\\n\\n{solution_start}S{solution_end}

Builders return the text and the CHARACTER spans of the explanation and the solution in it; the
rewards turn those into token positions with the tokenizer's offsets. Assistant turns are never
closed with the template's end-of-turn: the rewards score the text as the model continues it, and
a closed turn would add tokens (and some templates strip whitespace) that are not the teacher's.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, fields

from potstill.config import check
from potstill.data.chat import render_chat
from potstill.errors import DataError
from potstill.prompts import load_prompt
from potstill.teacher.backends import Request

Span = tuple[int, int]
"""Character range [start, end) in a rendered text."""

SEPARATOR = "\n\n"
"""Between the sections, and after the explanation tag (as in the paper's prompts)."""


@dataclass(frozen=True)
class RLTTags:
    """The section tags. Change them only together with prompts that name the new ones."""

    solution_start: str = "<|begin_of_solution|>"
    """Opens the solution (teacher and student)."""
    solution_end: str = "<|end_of_solution|>"
    """Closes the solution."""
    explanation_start: str = "<|begin_of_explanation|>"
    """Opens the teacher's explanation (the end of the generation prefill)."""
    explanation_end: str = "<|end_of_explanation|>"
    """Closes the explanation; a generation without it gets the missing-tag reward."""
    thought_start: str = "<|begin_of_thought|>"
    """Opens the student's thought (the explanation, seen from the student side)."""
    thought_end: str = "<|end_of_thought|>"
    """Closes the student's thought."""

    def __post_init__(self):
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in values.items():
            check(bool(value.strip()), f"{name}: empty; give the tag text, e.g. <|{name}|>")
        check(
            len(set(values.values())) == len(values),
            "tags: two tags are equal; every tag must be distinct so the sections can be found",
        )


@dataclass(frozen=True)
class Sample:
    """One explanation to score. `closed`: the teacher wrote the closing tag."""

    question: str
    solution: str
    explanation: str
    closed: bool = True
    id: str = ""


@dataclass(frozen=True)
class RLTText:
    """A rendered context and where its parts are (character spans into `text`)."""

    text: str
    solution: Span
    explanation: Span


def system_prompt(name_or_path: str | None, tags: RLTTags) -> str | None:
    """A bundled prompt (`rlt_teacher`, `rlt_student`) or text file, with `{tag}` fields filled.

    Placeholders are replaced by name (not `str.format`), so prompts may contain other braces.
    """
    if name_or_path is None:
        return None
    text = load_prompt(name_or_path)
    for f in fields(tags):
        text = text.replace("{" + f.name + "}", getattr(tags, f.name))
    return text


def _messages(system: str | None, question: str) -> list[dict]:
    user = [{"role": "user", "content": question}]
    return ([{"role": "system", "content": system}] if system else []) + user


def render_question(tokenizer, system: str | None, question: str) -> str:
    """System + user through the chat template, ending where the assistant starts writing:
    the text every backend prompts with (`data.chat.render_chat`), so the text scored is the
    text the teacher was prompted with."""
    return render_chat(tokenizer, _messages(system, question))


def teacher_prefill(solution: str, tags: RLTTags = RLTTags()) -> str:
    """The start of the teacher's turn: the solution, then the opened explanation section."""
    return (
        f"{tags.solution_start}{solution}{tags.solution_end}{SEPARATOR}"
        f"{tags.explanation_start}{SEPARATOR}"
    )


def teacher_request(
    key: str,
    question: str,
    solution: str,
    *,
    tags: RLTTags = RLTTags(),
    system: str | None = None,
    seed: int = 0,
) -> Request:
    """A generation request for the teacher: it continues the prefill with its explanation.

    `system` is the rendered system prompt (see `system_prompt`). Do not make the closing tag a
    stop string: backends cut stop strings from the output, and the tag is how
    `split_explanation` tells a closed explanation from a truncated one.
    """
    return Request(
        key=key,
        messages=tuple(_messages(system, question)),
        seed=seed,
        prefill=teacher_prefill(solution, tags),
    )


def split_explanation(generated: str, tags: RLTTags = RLTTags()) -> tuple[str, bool]:
    """(explanation, closed) from what the teacher wrote after the prefill.

    The explanation is everything before the first closing tag; `closed` is False when the teacher
    never wrote that tag (cut by max_new_tokens, or it wandered off), which the reward penalises.
    """
    end = generated.find(tags.explanation_end)
    if end < 0:
        return generated, False
    return generated[:end], True


def build_teacher_text(
    tokenizer,
    question: str,
    solution: str,
    explanation: str,
    *,
    tags: RLTTags = RLTTags(),
    system: str | None = None,
    closed: bool = True,
) -> RLTText:
    """The teacher's context for scoring: prompt + prefill + explanation (+ closing tag if closed).

    The closing tag is kept when the teacher wrote it because BPE may merge the explanation's last
    characters with it: the tokens scored are then the ones the teacher actually produced.
    """
    prompt = render_question(tokenizer, system, question)
    sol_start = len(prompt) + len(tags.solution_start)
    head = prompt + teacher_prefill(solution, tags)
    text = head + explanation + (tags.explanation_end if closed else "")
    return RLTText(
        text=text,
        solution=(sol_start, sol_start + len(solution)),
        explanation=(len(head), len(head) + len(explanation)),
    )


def build_student_text(
    tokenizer,
    question: str,
    solution: str,
    explanation: str,
    *,
    tags: RLTTags = RLTTags(),
    system: str | None = None,
) -> RLTText:
    """The student's context: prompt + the explanation as its thought + the solution."""
    prompt = render_question(tokenizer, system, question)
    expl_start = len(prompt) + len(tags.thought_start)
    expl_end = expl_start + len(explanation)
    sol_start = expl_end + len(tags.thought_end) + len(SEPARATOR) + len(tags.solution_start)
    text = (
        f"{prompt}{tags.thought_start}{explanation}{tags.thought_end}{SEPARATOR}"
        f"{tags.solution_start}{solution}{tags.solution_end}"
    )
    return RLTText(
        text=text,
        solution=(sol_start, sol_start + len(solution)),
        explanation=(expl_start, expl_end),
    )


def overlapping(offsets: Sequence[tuple[int, int]], span: Span) -> list[int]:
    """Positions of the tokens whose character range overlaps `span` (never position 0, which
    no earlier position predicts). An empty span has no tokens, even where a token that BPE
    merged across the two tags around it straddles the point."""
    start, end = span
    if start == end:
        return []
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start and i > 0]


def align_groups(
    a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]], length: int
) -> tuple[list[int], list[int], int]:
    """Group two tokenisations of one text (char ranges relative to it) into common pieces.

    A cut is a character position where a token ends and the next one starts no earlier (bytes
    of one character split over tokens share a range: no cut inside them). The groups are the
    pieces between the cuts both tokenisations share. Returns each token's group, and the count.
    """

    def cuts(ranges):
        ends = [min(e, length) for _, e in ranges]
        found = {e for k, e in enumerate(ends) if k + 1 == len(ranges) or ranges[k + 1][0] >= e}
        return found | {length}

    common = sorted(cuts(a) & cuts(b))
    groups = [[bisect_left(common, min(e, length)) for _, e in r] for r in (a, b)]
    return groups[0], groups[1], len(common) if a else 0


@dataclass
class Tokenised:
    """One sample tokenised in both contexts, with the positions the rewards read."""

    sample: Sample
    teacher_ids: list[int]
    student_ids: list[int]
    teacher_expl: list[int]
    student_expl: list[int]
    student_sol: list[int]
    teacher_groups: list[int]
    """The D_k term each teacher explanation token adds to (see `align_groups`)."""
    student_groups: list[int]
    n_groups: int
    skipped: str | None = None


def _encode(tokenizer, texts: list[RLTText]):
    return tokenizer([t.text for t in texts], add_special_tokens=False, return_offsets_mapping=True)


def tokenise(
    samples: Sequence[Sample],
    teacher_tokenizer,
    student_tokenizer,
    *,
    tags: RLTTags = RLTTags(),
    teacher_system: str | None = None,
    student_system: str | None = None,
) -> list[Tokenised]:
    """Render both contexts, tokenise them (one call per side) and locate the scored tokens.

    Raises DataError naming the record when a solution is empty (r^SS would have no tokens).
    """
    teacher_texts = [
        build_teacher_text(teacher_tokenizer, s.question, s.solution, s.explanation, tags=tags,
                           system=teacher_system, closed=s.closed)
        for s in samples
    ]  # fmt: skip
    student_texts = [
        build_student_text(student_tokenizer, s.question, s.solution, s.explanation, tags=tags,
                           system=student_system)
        for s in samples
    ]  # fmt: skip
    t_enc, s_enc = (
        _encode(teacher_tokenizer, teacher_texts),
        _encode(student_tokenizer, student_texts),
    )
    out = []
    for i, sample in enumerate(samples):
        t_text, s_text = teacher_texts[i], student_texts[i]
        t_off, s_off = t_enc["offset_mapping"][i], s_enc["offset_mapping"][i]
        t_expl = overlapping(t_off, t_text.explanation)
        s_expl = overlapping(s_off, s_text.explanation)
        s_sol = overlapping(s_off, s_text.solution)
        if not s_sol:
            raise DataError(
                f"record '{sample.id}': empty solution; RLT scores the student's log-probs of "
                "the solution tokens, so every record needs a non-empty solution"
            )
        t0, s0 = t_text.explanation[0], s_text.explanation[0]
        t_groups, s_groups, n = align_groups(
            [(t_off[p][0] - t0, t_off[p][1] - t0) for p in t_expl],
            [(s_off[p][0] - s0, s_off[p][1] - s0) for p in s_expl],
            len(sample.explanation),
        )
        out.append(
            Tokenised(sample, t_enc["input_ids"][i], s_enc["input_ids"][i], t_expl, s_expl,
                      s_sol, t_groups, s_groups, n)
        )  # fmt: skip
    return out
