"""The OpenAI chat-completions protocol as `potstill serve` speaks it: request framing and
validation, replies, and OpenAI-style errors (for backend failures too), apart from the HTTP and
batching machinery in `potstill.teacher.serve`."""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.message import Message

from jinja2 import TemplateError, TemplateSyntaxError

from potstill.teacher.backends import Generation, Request

logger = logging.getLogger("potstill.teacher.serve")

ROLES = ("system", "user", "assistant", "tool", "developer")


class RequestError(Exception):
    """An OpenAI-style error reply."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}
        }


@dataclass
class ChatJob:
    request: Request
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    done: threading.Event = field(default_factory=threading.Event)
    generation: Generation | None = None
    error: RequestError | None = None

    def finish(self, generation: Generation | None = None, error: RequestError | None = None):
        self.generation, self.error = generation, error
        self.done.set()


def backend_failure(exc: Exception, doing: str, *, one_request: bool = True) -> RequestError:
    """The reply for an exception from the backend. A chat template that refuses the messages
    (`raise_exception` in the template, e.g. on a role it does not take) is the client's fault:
    400 with the template's message, when the failure was for `one_request` alone (in a batch we
    cannot tell whose messages it refused). Anything else is ours: 500, naming only the exception
    type (its message may hold server internals); the operator gets one line, the traceback at
    debug."""
    refused = isinstance(exc, TemplateError) and not isinstance(exc, TemplateSyntaxError)
    if refused and one_request:
        logger.debug("the chat template refused a request: %s", exc)
        return RequestError(400, f"the model's chat template refused these messages: {exc}")
    logger.warning("%s failed: %s: %s", doing, type(exc).__name__, exc)
    logger.debug("%s failed", doing, exc_info=exc)
    return RequestError(500, f"{doing} failed: {type(exc).__name__}", "server_error")


def body_length(headers: Message, method: str, max_body: int) -> int:
    """The request body's size from its headers, or RequestError: 411 without one on a POST,
    400 unless it is one plain decimal (`-1`, `1e3`, two different values), 413 past `max_body`.
    """
    if headers.get("Transfer-Encoding"):
        raise RequestError(411, "send the body with a Content-Length (no Transfer-Encoding)")
    lengths = {value.strip() for value in headers.get_all("Content-Length") or ()}
    if not lengths:
        if method == "POST":
            raise RequestError(411, "a POST needs a Content-Length header")
        return 0
    value = ", ".join(sorted(lengths))
    if not re.fullmatch(r"[0-9]{1,19}", value):
        raise RequestError(400, f"Content-Length: must be a decimal byte count, got {value!r}")
    if int(value) > max_body:
        raise RequestError(413, f"the body is {value} bytes, over the {max_body} taken")
    return int(value)


def unauthorized() -> RequestError:
    return RequestError(401, "Incorrect or missing API key", code="invalid_api_key")


def parse_chat_request(body: bytes, model_name: str) -> ChatJob:
    """Validate a chat completion request body; RequestError (400/404) says what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: `[[[[...` nested
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = data.get("model")
    if model is not None and model != model_name:
        raise RequestError(
            404,
            f"The model `{model}` does not exist; this server serves `{model_name}`",
            code="model_not_found",
        )
    if data.get("stream"):
        raise RequestError(400, "stream: not supported by this server; set stream: false")
    if data.get("n", 1) != 1:
        raise RequestError(400, f"n: only 1 is supported, got {data.get('n')!r}")
    messages = [_message(m, i) for i, m in enumerate(_require_list(data.get("messages")))]
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise RequestError(400, f"max_tokens: must be an integer >= 1, got {max_tokens!r}")
    temperature = _number(data, "temperature", 1.0)
    top_p = _number(data, "top_p", 1.0)
    if not 0 <= temperature <= 2:
        raise RequestError(400, f"temperature: must be in [0, 2], got {temperature}")
    if not 0 < top_p <= 1:
        raise RequestError(400, f"top_p: must be in (0, 1], got {top_p}")
    stop = data.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop: must be a string or a list of non-empty strings")
    seed = data.get("seed")
    # the int64 range, as vLLM takes it: a larger seed would fail the whole batch in the backend
    if seed is not None and not (_is_int(seed) and -(2**63) <= seed < 2**63):
        raise RequestError(400, f"seed: must be a 64-bit integer, got {seed!r}")
    prefill = ""
    if data.get("continue_final_message", False):
        if data.get("add_generation_prompt", True):
            raise RequestError(
                400, "Cannot set both continue_final_message and add_generation_prompt to true"
            )
        if messages[-1]["role"] != "assistant":
            raise RequestError(400, "continue_final_message: the last message must be assistant")
        prefill = messages.pop()["content"]
    elif data.get("add_generation_prompt", True) is not True:
        raise RequestError(
            400, "add_generation_prompt: false is only supported with continue_final_message"
        )
    request = Request(
        key=f"chatcmpl-{uuid.uuid4().hex}",
        messages=tuple(messages),
        # no seed: a fresh sample each time, as OpenAI does
        seed=seed if seed is not None else random.randrange(2**31),
        prefill=prefill,
    )
    return ChatJob(request, max_tokens, float(temperature), float(top_p), tuple(stop))


def completion(job: ChatJob, model_name: str) -> dict:
    """The `chat.completion` reply for a finished job."""
    generation = job.generation
    usage = {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": generation.text},
        "logprobs": None,
        "finish_reason": generation.finish_reason,
    }
    return {
        "id": job.request.key,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [choice],
        "usage": usage,
    }


def _require_list(messages) -> list:
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: must be a non-empty list of {role, content} objects")
    return messages


def _message(message, index: int) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(400, f"messages[{index}]: needs a role, one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = "".join(p for p in parts if isinstance(p, str))
    if not isinstance(content, str):
        raise RequestError(400, f"messages[{index}].content: must be a string")
    return {"role": message["role"], "content": content}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(data: dict, name: str, default: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(400, f"{name}: must be a number, got {value!r}")
    return float(value)
