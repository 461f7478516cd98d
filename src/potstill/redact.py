"""Credentials out of everything potstill prints or stores.

A user may put a key in a URL (`http://user:sk-...@host/v1`, `...?api_key=...`), and a server's
error may echo the Authorization header it got. `redact` masks both in any text, and the API keys
this process has read (`add_secret`) wherever they appear; `redact_data` does it to every string
of a config, manifest or provenance dict. One function, so every writer masks the same things:
run directories (config.yaml, manifest, logs), samples' provenance, backend errors, the CLI.
"""

from __future__ import annotations

import re

MASK = "***"

MIN_SECRET_CHARS = 8
"""Shorter values are not scrubbed: a key like `EMPTY` (vLLM's placeholder) or `abc` would mask
every occurrence of a common word, and is no secret worth the garbled output."""

_SECRETS: set[str] = set()

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s?#@]*@")
"""`scheme://user:password@`: the whole user-info goes (the user name may be the key itself)."""
_QUERY = re.compile(
    r"(?i)([?&;](?:api[_-]?key|key|access[_-]?token|token|auth|password|passwd|secret"
    r"|client[_-]?secret|sig|signature)=)(?:[^&;#\s'\"<>,)\]:]|:(?!\s|$))+"
)
"""A key-like query parameter's value, up to the next parameter or the end of the URL (a `:`
ends it only before a space: messages read `{url}: {problem}`)."""
_HEADER = re.compile(
    r"(?i)(\b(?:proxy-)?authorization|\bx-api-key|\bapi[_-]?key)"
    r"([\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic|token)\s+)?(?:[^\s\"',;}&:]|:(?!\s|$))+"
)
"""`Authorization: Bearer sk-...`, `"api_key": "..."`, as a server or a dump may echo them."""
_BEARER = re.compile(r"\b(Bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
_KEY_SHAPES = re.compile(r"\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,})")
"""Keys recognisable by their shape (OpenAI-style, Hugging Face), wherever they stand."""


def add_secret(value: str | None) -> None:
    """Scrub `value` (an API key this process read) from everything `redact` sees from now on."""
    if value and len(value) >= MIN_SECRET_CHARS:
        _SECRETS.add(value)


def redact(text: str) -> str:
    """`text` with every credential it holds replaced by `***`."""
    if not isinstance(text, str) or not text:
        return text
    # The longest secret first, so one that contains another is masked whole.
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _QUERY.sub(rf"\1{MASK}", text)
    text = _HEADER.sub(rf"\1\2{MASK}", text)
    text = _BEARER.sub(rf"\1 {MASK}", text)
    return _KEY_SHAPES.sub(MASK, text)


def redact_data(value):
    """A copy of a JSON-like value (dicts, lists, tuples, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_data(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_data(item) for item in value)
    return value
