"""Answer extraction and verification: `verify(record, completion) -> float` in [0, 1].

The task field picks the verifier: `rg:NAME` uses reasoning-gym's own scorer, `math` uses
math-verify, `regex` fullmatches the extracted answer against the record's `answer` (a pattern),
anything else compares the extracted answer exactly (after trimming).
"""

from __future__ import annotations

import functools
import re

from potstill.errors import DataError

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_HASHES = re.compile(r"####\s*(.+)")
_ANSWER_LINE = re.compile(r"(?im)^\s*\**(?:final\s+)?answer\**\s*[:：]\s*\**(.+?)\**\s*$")
_ANSWER_IS = re.compile(r"(?i)(?:final answer|answer|result) is[:\s]*\$?([^\s$]+?)\$?\s*(?:\.|$)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def find_answer(completion: str) -> str | None:
    """The answer a completion states: the last \\boxed{}; else the last marked answer
    (`#### x`, an `Answer: x` line, "the answer is x"), whichever comes last; else the last
    number. None when it states none, so curation can tell "no answer" from "wrong answer"."""
    boxed = _BOXED.findall(completion)
    if boxed:
        return _clean(boxed[-1])
    marked = [m for p in (_HASHES, _ANSWER_LINE, _ANSWER_IS) for m in p.finditer(completion)]
    if marked:
        return _clean(max(marked, key=lambda m: m.end()).group(1))
    numbers = _NUMBER.findall(completion)
    if numbers:
        return numbers[-1].replace(",", "")
    return None


def extract_answer(completion: str) -> str:
    """The final answer in a completion: `find_answer`, else (a guess, for tasks whose answers
    are words) the last non-empty line."""
    found = find_answer(completion)
    if found is not None:
        return found
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _clean(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip("$ ")
    boxed = _BOXED.findall(answer)  # "Answer: \\boxed{-3}"
    return boxed[-1].strip() if boxed else answer


@functools.lru_cache(maxsize=64)
def _rg_scorer(name: str):
    from reasoning_gym.factory import get_score_answer_fn

    return get_score_answer_fn(name)


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def verify(record: dict, completion: str) -> float:
    """Score `completion` against the record's answer with the record's task verifier."""
    if (record.get("task") or "exact") == "math":
        return score_answer(record, completion)  # math-verify finds the answer itself
    return score_answer(record, extract_answer(completion))


def score_answer(record: dict, answer: str) -> float:
    """Score an already extracted answer with the record's task verifier."""
    task = record.get("task") or "exact"
    gold = record.get("answer") or record.get("solution") or ""
    if task.startswith("rg:"):
        entry = {
            "question": record["question"],
            "answer": gold,
            "metadata": record.get("metadata", {}),
        }
        return float(_rg_scorer(task[3:])(answer=answer, entry=entry))
    if task == "math":
        from math_verify import parse
        from math_verify import verify as math_equal

        return float(math_equal(parse(gold), parse(answer)))
    if task == "regex":
        try:
            pattern = _compiled(gold)
        except re.error as exc:
            raise DataError(
                f"record '{record.get('id')}': answer {gold!r} is not a valid regex ({exc}); "
                "fix the pattern, or use task 'exact' for a literal answer"
            ) from None
        return float(pattern.fullmatch(answer.strip()) is not None)
    return float(answer == gold.strip())


def check_gold(records: list[dict], where: str) -> None:
    """Refuse records whose own gold answer their verifier does not accept: such a record can
    only ever score 0, which would quietly lower every model's accuracy."""
    for record in records:
        task = record.get("task") or "exact"
        gold = record.get("answer") or record.get("solution") or ""
        if task == "regex":
            score_answer(record, "")  # compiles the pattern; a bad one raises naming the record
            continue
        if not gold.strip():
            raise DataError(f"{where}: record '{record.get('id')}' has no answer to verify against")
        if task == "math":
            from math_verify import parse

            if not parse(gold):
                raise DataError(
                    f"{where}: record '{record.get('id')}': math-verify cannot parse the gold "
                    f"answer {gold[:60]!r}; write it as a number or LaTeX expression"
                )
            continue
        try:
            score = score_answer(record, gold)
        except Exception as exc:  # a scorer that crashes on its own gold answer
            raise DataError(
                f"{where}: record '{record.get('id')}': the {task} verifier fails on the "
                f"record's own answer {gold[:60]!r} ({type(exc).__name__}: {exc})"
            ) from None
        if score < 1.0:
            raise DataError(
                f"{where}: record '{record.get('id')}': the {task} verifier does not accept the "
                f"record's own answer {gold[:60]!r}; fix the answer or pick the right task"
            )
