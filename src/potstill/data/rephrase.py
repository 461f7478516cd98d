"""The same arithmetic problems, phrased in ways no generator wrote: held-out sets that test
whether a student learnt the skill or the template it was trained on.

`rg:NAME?...&phrasing=STYLE` rewrites each question of a reasoning-gym task whose entries carry
the expression they ask about (basic_arithmetic, chain_sum, decimal_chain_sum, products). The
expression, and so the gold answer and reasoning-gym's scorer, stay exactly as generated; only the
words around them change. Styles:
- `wording`: the symbols kept, the instruction reworded (five templates, one per question in turn);
- `words`: operators written out ("plus", "times"), whole numbers under 100 as English words,
  and the precedence rule stated, since "a plus b times c" is ambiguous in speech.
"""

from __future__ import annotations

import re

from potstill.errors import DataError

STYLES = ("wording", "words")
WORDING = (
    "Work out the value of {e}.",
    "Evaluate the expression {e} and give the result.",
    "What number do you get from {e}?",
    "Compute: {e} = ?",
    "Find the result of {e}. Show your working.",
)
WORDS = (
    "What is {e}? Multiplication and division are done before addition and subtraction.",
    "Say what {e} equals (multiply and divide first, then add and subtract, left to right).",
)
OPERATORS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_TOKEN = re.compile(r"\s*(-?\d+(?:\.\d+)?|[-+*/()])")


def number_words(n: int) -> str:
    """English words for an integer with |n| < 100: 77 -> 'seventy-seven', -8 -> 'negative
    eight'."""
    if n < 0:
        return "negative " + number_words(-n)
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def _spoken(expression: str) -> str:
    """'77 + 98 * -99' -> 'seventy-seven plus ninety-eight times negative ninety-nine'."""
    out, tokens = [], _tokens(expression)
    for i, token in enumerate(tokens):
        unary = token == "-" and (i == 0 or tokens[i - 1] in "(+-*/")
        if unary:  # '-( 2 * 4 )': a sign, not a subtraction
            out.append("the negative of")
        elif token in OPERATORS:
            out.append(OPERATORS[token])
        elif token in "()":
            out.append({"(": "the quantity (", ")": ")"}[token])
        elif re.fullmatch(r"-?\d+", token) and abs(int(token)) < 100:
            out.append(number_words(int(token)))
        else:
            out.append(token)
    spoken = " ".join(out).replace("( ", "(").replace(" )", ")")
    return spoken.replace("the negative of the quantity (", "the negative of (")


def _tokens(expression: str) -> list[str]:
    tokens, at = [], 0
    while at < len(expression.rstrip()):
        match = _TOKEN.match(expression, at)
        if not match:
            raise ValueError(f"cannot read {expression[at:]!r}")
        tokens.append(match.group(1))
        at = match.end()
    return tokens


def rephrase(record: dict, style: str, index: int, spec: str) -> dict:
    """`record` with its question rewritten in `style` (the template picked by `index`); its id
    says the style, so a rephrased set never shares an id with the plain one."""
    expression = record.get("metadata", {}).get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise DataError(
            f"{spec}: phrasing needs questions that carry their expression (basic_arithmetic, "
            "chain_sum, decimal_chain_sum, products); this task's do not"
        )
    expression = expression.strip()
    if style == "wording":
        question = WORDING[index % len(WORDING)].format(e=expression)
    else:
        try:
            spoken = _spoken(expression)
        except ValueError:
            raise DataError(
                f"{spec}: cannot phrase the expression {expression!r} in words"
            ) from None
        question = WORDS[index % len(WORDS)].format(e=spoken)
    metadata = {**record.get("metadata", {}), "phrasing": style}
    return {**record, "id": f"{record['id']}-{style}", "question": question, "metadata": metadata}


def check_style(spec: str, style: object) -> str:
    if style not in STYLES:
        raise DataError(f"{spec}: phrasing must be one of {', '.join(STYLES)}, got {style!r}")
    return style
