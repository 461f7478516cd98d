"""The OpenAI chat-completions protocol as `potstill serve` speaks it: request validation and
OpenAI-style errors, apart from the HTTP and batching machinery in `potstill.serve`."""

from __future__ import annotations

import json
import random
import threading
import uuid
from dataclasses import dataclass, field

from potstill.teacher.backends import Generation, Request

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


def unauthorized() -> RequestError:
    return RequestError(401, "Incorrect or missing API key", code="invalid_api_key")


def parse_chat_request(body: bytes, model_name: str) -> ChatJob:
    """Validate a chat completion request body; RequestError (400/404) says what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
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
    if seed is not None and not _is_int(seed):
        raise RequestError(400, f"seed: must be an integer, got {seed!r}")
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
