"""Values and keys inside error messages: short, printable, on one line.

A message quotes what the user gave, and what they gave may be anything: a 100,000-character
string, an integer with 5,000 digits (whose plain repr raises ValueError), a newline, a lone
surrogate (which makes the CLI's print of the message fail), a list nested a thousand deep.
"""

from __future__ import annotations

import datetime
import math
import reprlib

PLAIN = (str, bytes, int, float, bool, list, tuple, dict, set, frozenset, type(None), datetime.date)
"""Types whose repr is the value itself; any other object is named by its type alone (its repr
may be `<... object at 0x...>`, which says nothing to a user)."""
MAX_KEY = 80


class _Short(reprlib.Repr):
    def __init__(self):
        super().__init__()
        self.maxstring = self.maxother = 60
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 5
        self.maxlevel = 3

    def repr_int(self, x, level):
        if x.bit_length() > 256:
            return f"(an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits)"
        return repr(x)

    def repr_instance(self, x, level):  # bool, float, None, date...; an object by its type
        return super().repr_instance(x, level) if isinstance(x, PLAIN) else type(x).__name__


_SHORT = _Short()


def shown(value) -> str:
    """A short repr of `value`, safe to print: strings are quoted and escaped, long ones cut."""
    if not isinstance(value, PLAIN):
        return type(value).__name__
    return one_line(_SHORT.repr(value))


def described(value) -> str:
    """`value` with its type, for "expected X, got ...": "str 'four'", "bool True"."""
    if not isinstance(value, PLAIN):
        return f"a {type(value).__name__}"
    return f"{type(value).__name__} {shown(value)}"


def key_name(key) -> str:
    """A key as the user wrote it, escaped where it is not printable and cut when long."""
    text = one_line(key) if isinstance(key, str) else shown(key)
    return text if len(text) <= MAX_KEY else text[: MAX_KEY - 3] + "..."


def one_line(text: str) -> str:
    """`text` with line breaks, control characters and lone surrogates written as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
