"""Pure curation filters: each takes a list of records and returns `(kept, dropped)`.

Nothing is mutated: every returned record is a new dict with the input's fields unchanged and the
filter's own fields added (`drop_reason` on dropped ones; `verified` and `score` from verification).
Both lists keep the input order, so `kept + dropped` is always a rearrangement of the input and a
rerun on the same input gives the same split.

Drop reasons: `truncated`, `unclosed_tag`, `missing_pattern` (format); `too_short`, `too_long`
(length); `no_answer`, `wrong_answer` (verify); `duplicate`, `near_duplicate` (dedup);
`student_solves` (difficulty). Selection (`over_k`) lives in `select.py`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Literal

from potstill.data.verifiers import find_answer, verify

Split = tuple[list[dict], list[dict]]
"""(kept, dropped), each in input order."""

DEFAULT_TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"),)


def question_id(record: dict) -> str:
    """The question a sample answers: `source_id`, shared by a question's N samples, else `id`."""
    return record.get("source_id") or record["id"]


def completion_tokens(record: dict) -> int:
    """The trace's length: the generator's own token count when recorded, else whitespace words."""
    count = record.get("completion_tokens")
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    return len(record.get("completion", "").split())


def word_ngrams(text: str, n: int) -> set[str]:
    """Lower-cased word n-grams; a text shorter than n words is one gram (so it still compares)."""
    words = text.lower().split()
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _dropped(record: dict, reason: str, **fields) -> dict:
    return {**record, **fields, "drop_reason": reason}


def check_format(
    records: Sequence[dict],
    *,
    drop_truncated: bool = True,
    tags: Iterable[Sequence[str]] = DEFAULT_TAGS,
    require: str | None = None,
) -> Split:
    """Drop traces that were cut off (`finish_reason == "length"` -> `truncated`), whose tags are
    not opened and closed in order (`unclosed_tag`), or that lack the `require` regex
    (`re.search`; `missing_pattern`).

    A truncated trace teaches the student to stop mid-thought; an unclosed `<think>` teaches it
    never to leave the thinking block. One leading closing tag is accepted: chat templates such as
    Qwen3's and DeepSeek-R1's open `<think>` in the prompt, so the completion only closes it.
    """
    pairs = [tuple(pair) for pair in tags]
    pattern = re.compile(require) if require else None
    kept, dropped = [], []
    for record in records:
        text = record["completion"]
        if drop_truncated and record.get("finish_reason") == "length":
            dropped.append(_dropped(record, "truncated"))
        elif not all(_tags_balanced(text, opening, closing) for opening, closing in pairs):
            dropped.append(_dropped(record, "unclosed_tag"))
        elif pattern is not None and not pattern.search(text):
            dropped.append(_dropped(record, "missing_pattern"))
        else:
            kept.append(dict(record))
    return kept, dropped


def _tags_balanced(text: str, opening: str, closing: str) -> bool:
    """Occurrences alternate open, close, open, close, ... and end closed (no nesting)."""
    marks = sorted(
        [(m.start(), True) for m in re.finditer(re.escape(opening), text)]
        + [(m.start(), False) for m in re.finditer(re.escape(closing), text)]
    )
    if marks and not marks[0][1]:
        marks = marks[1:]  # opened by the chat template, closed here
    is_open = False
    for _, opens in marks:
        if opens == is_open:  # an open inside an open, or a close with nothing open
            return False
        is_open = opens
    return not is_open


def check_length(
    records: Sequence[dict], *, min_tokens: int = 1, max_tokens: int | None = None
) -> Split:
    """Drop traces shorter than `min_tokens` (`too_short`) or longer than `max_tokens`
    (`too_long`), counted by `completion_tokens` when present, else by whitespace words."""
    kept, dropped = [], []
    for record in records:
        n = completion_tokens(record)
        if n < min_tokens:
            dropped.append(_dropped(record, "too_short"))
        elif max_tokens is not None and n > max_tokens:
            dropped.append(_dropped(record, "too_long"))
        else:
            kept.append(dict(record))
    return kept, dropped


def verify_samples(records: Sequence[dict], *, threshold: float = 1.0) -> Split:
    """Score each trace with its record's verifier (`score`); keep those scoring >= `threshold`
    (`verified`). A failed trace is `no_answer` when it states no answer at all (no \\boxed{},
    no marked answer, no number), else `wrong_answer`: the first points at the prompt or the
    token budget, the second at the teacher."""
    kept, dropped = [], []
    for record in records:
        score = verify(record, record["completion"])
        if score >= threshold:
            kept.append({**record, "score": score, "verified": True})
        else:
            reason = "no_answer" if find_answer(record["completion"]) is None else "wrong_answer"
            dropped.append(_dropped(record, reason, score=score, verified=False))
    return kept, dropped


def dedup_samples(
    records: Sequence[dict],
    *,
    exact: bool = True,
    near: bool = True,
    threshold: float = 0.8,
    ngram: int = 3,
    num_perm: int = 128,
    scope: Literal["question", "all"] = "question",
) -> Split:
    """Drop repeated traces: `duplicate` when equal after normalising case and whitespace,
    `near_duplicate` when the MinHash estimate of their word-`ngram` Jaccard similarity to an
    earlier kept trace is >= `threshold` (LSH finds the candidates, datasketch).

    `scope="question"` compares a question's samples with each other (N samples of one question
    that say the same thing teach the student once, not N times); `"all"` compares across the
    whole set. The earliest record in input order is the one kept; dropped ones name it in
    `duplicate_of`. MinHash uses a fixed seed, so the split is deterministic.
    """
    from datasketch import MinHash, MinHashLSH

    seen_exact: dict[tuple[str, str], str] = {}
    indexes: dict[str, MinHashLSH] = {}
    signatures: dict[str, MinHash] = {}
    position: dict[str, int] = {}  # input order of indexed records: name the earliest match
    kept, dropped = [], []
    for record in records:
        group = question_id(record) if scope == "question" else ""
        text = record["completion"]
        normalised = " ".join(text.lower().split())
        if exact and (first := seen_exact.get((group, normalised))) is not None:
            dropped.append(_dropped(record, "duplicate", duplicate_of=first))
            continue
        grams = word_ngrams(text, ngram) if near else set()
        if grams:
            signature = MinHash(num_perm=num_perm, seed=1)
            signature.update_batch([g.encode("utf-8") for g in sorted(grams)])
            index = indexes.setdefault(group, MinHashLSH(threshold=threshold, num_perm=num_perm))
            similar = [
                key
                for key in index.query(signature)
                if signatures[key].jaccard(signature) >= threshold
            ]
            if similar:
                first = min(similar, key=position.__getitem__)
                dropped.append(_dropped(record, "near_duplicate", duplicate_of=first))
                continue
            position[record["id"]] = len(position)
            signatures[record["id"]] = signature
            index.insert(record["id"], signature)
        seen_exact.setdefault((group, normalised), record["id"])
        kept.append(dict(record))
    return kept, dropped


def solve_rates(student_records: Sequence[dict], *, threshold: float = 1.0) -> dict[str, float]:
    """Fraction of the student's own samples that verify, per question."""
    solved: dict[str, list[bool]] = defaultdict(list)
    for record in student_records:
        solved[question_id(record)].append(verify(record, record["completion"]) >= threshold)
    return {question: sum(flags) / len(flags) for question, flags in solved.items()}


def drop_solved_by_student(
    records: Sequence[dict], student_rates: dict[str, float], *, threshold: float = 0.75
) -> Split:
    """Drop every sample of a question the student already solves at a rate >= `threshold`
    (`student_solves`): training on what it can do spends compute and teaches nothing new.
    Questions the student was not sampled on are kept."""
    kept, dropped = [], []
    for record in records:
        rate = student_rates.get(question_id(record))
        if rate is not None and rate >= threshold:
            dropped.append(_dropped(record, "student_solves", student_solve_rate=rate))
        else:
            kept.append(dict(record))
    return kept, dropped
