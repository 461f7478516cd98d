"""The `openai` backend: any OpenAI-compatible `/chat/completions` endpoint over HTTP.

Works with `vllm serve`, `potstill serve`, and hosted API providers. Each request is one
non-streaming chat completion with its own seed; up to `concurrency` are in flight at once (per
endpoint) and results come back as each finishes. Given several base URLs (replicas of one
model), each record goes to the endpoint its id hashes to, so a rerun sends it to the same one
and one record's samples share a server's prefix cache. 429s, 5xx, timeouts and dropped
connections are retried with exponential backoff plus jitter (a `Retry-After` header wins);
other 4xx are not retried.

Pre-filling (`Request.prefill`, used by RLT) is not part of the OpenAI API: the prefill is sent
as a final assistant message with vLLM's extension fields `continue_final_message: true,
add_generation_prompt: false`, which vLLM and `potstill serve` honour. A plain OpenAI endpoint
would ignore them and answer a fresh assistant turn, so use pre-filling with those servers only.

The API key is read from the environment variable named by `api_key_env`; it is sent in the
Authorization header and never appears in `describe()`, `repr` or error messages. Neither does a
key given in the URL (`http://user:key@host/v1`, `?api_key=...`) or one a server's error echoes:
everything this backend describes or raises passes through `potstill.redact`. A base URL's query
(`/v1?api-version=...`) is kept after the `/chat/completions` it gains.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import httpx

from potstill.errors import ConfigError, PotstillError
from potstill.redact import add_secret, redact, redact_data
from potstill.teacher.backends import Backend, Generation, Request, Sampling

MAX_WAIT = 600.0
"""Longest pause between tries, whatever the backoff or a server's Retry-After says."""

_DONE = object()


class EndpointError(PotstillError):
    """The endpoint rejected a request or kept failing after every retry."""

    def __init__(self, message: str):
        super().__init__(redact(message))  # it names the URL, and may quote the server


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 300.0,
        max_retries: int = 6,
        backoff: float = 1.0,
    ):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ConfigError("base_url: empty list; give at least one endpoint URL")
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ConfigError(
                    f"base_url: must start with http:// or https://, got {redact(str(url))!r}"
                )
        if concurrency < 1 or timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ConfigError(
                f"openai backend: need concurrency >= 1, timeout > 0, max_retries >= 0, "
                f"backoff >= 0; got {concurrency}, {timeout}, {max_retries}, {backoff}"
            )
        self.base_urls = [url.rstrip("/") for url in urls]
        self.base_url = self.base_urls[0]
        self.model = model
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.urls = [_chat_url(url) for url in self.base_urls]
        self.url = self.urls[0]
        self._headers = {"User-Agent": "potstill"}
        if api_key_env is not None:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise ConfigError(
                    f"the openai backend reads its API key from ${api_key_env}, which is not set: "
                    f"export {api_key_env}=..., or set api_key_env: null for a server without auth"
                )
            add_secret(key)
            self._headers["Authorization"] = f"Bearer {key}"

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={redact(self.base_url)!r}, model={self.model!r})"

    def describe(self) -> dict:
        urls = self.base_url if len(self.base_urls) == 1 else self.base_urls
        return redact_data({"backend": self.name, "base_url": urls, "model": self.model})

    def endpoint_of(self, request: Request) -> int:
        """The endpoint a request goes to: a hash of its record id (the key up to '#')."""
        from potstill.data.sharding import shard_of

        return shard_of(request.key.rsplit("#", 1)[0], len(self.urls))

    def generate(
        self, requests: Sequence[Request], sampling: Sampling
    ) -> Iterator[tuple[Request, Generation]]:
        # The HTTP work runs on an asyncio loop in a worker thread and hands each result over a
        # queue the moment it arrives, so the caller writes it to disk while `concurrency`
        # others stay in flight (windows of requests would idle on each window's slowest one).
        # The queue is FIFO and an error is queued after everything finished before it, so
        # nothing completed is lost when a later request fails.
        if not requests:
            return
        results: queue.Queue = queue.Queue()
        loop = asyncio.new_event_loop()
        task = loop.create_task(self._produce(list(requests), sampling, results))
        thread = threading.Thread(target=_run_loop, args=(loop, task), daemon=True)
        thread.start()
        try:
            while (item := results.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # also when the caller stops early: cancel what is still in flight
            if thread.is_alive():
                try:
                    loop.call_soon_threadsafe(task.cancel)
                except RuntimeError:  # the loop closed in the meantime
                    pass
            thread.join()

    async def _produce(self, requests: list[Request], sampling: Sampling, results: queue.Queue):
        pending = iter(requests)  # shared by the workers: each request is taken once
        slots = [asyncio.Semaphore(self.concurrency) for _ in self.urls]  # per endpoint

        async def worker(client: httpx.AsyncClient):
            for request in pending:
                async with slots[self.endpoint_of(request)]:
                    results.put((request, await self._complete(client, request, sampling)))

        connections = self.concurrency * len(self.urls)
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        try:
            async with httpx.AsyncClient(
                headers=self._headers, timeout=self.timeout, limits=limits
            ) as client:
                async with asyncio.TaskGroup() as group:  # the first error cancels the rest
                    for _ in range(min(connections, len(requests))):
                        group.create_task(worker(client))
        except Exception as exc:
            while isinstance(exc, BaseExceptionGroup):
                exc = exc.exceptions[0]
            results.put(exc)
        else:
            results.put(_DONE)

    def _payload(self, request: Request, sampling: Sampling) -> dict:
        payload = {
            "model": self.model,
            "messages": list(request.messages),
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": request.seed,
            "n": 1,
            "stream": False,
        }
        if sampling.stop:
            payload["stop"] = list(sampling.stop)
        if request.prefill:  # vLLM's extension; see the module docstring
            payload["messages"].append({"role": "assistant", "content": request.prefill})
            payload["continue_final_message"] = True
            payload["add_generation_prompt"] = False
        return payload

    async def _complete(
        self, client: httpx.AsyncClient, request: Request, sampling: Sampling
    ) -> Generation:
        payload = self._payload(request, sampling)
        url = self.urls[self.endpoint_of(request)]
        tries = self.max_retries + 1
        for attempt in range(1, tries + 1):
            wait = None
            try:
                async with asyncio.timeout(self.timeout):  # the whole request, not per read
                    response = await client.post(url, json=payload)
            except (TimeoutError, httpx.TimeoutException):
                problem = f"no answer within {self.timeout:g} s"
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                problem = f"connection failed ({type(exc).__name__}: {_one_line(str(exc))})"
            else:
                if response.status_code == 200:
                    return self._parse(response, url)
                status = response.status_code
                problem = f"HTTP {status} ({_server_message(response)})"
                if status != 429 and status < 500:
                    raise EndpointError(
                        f"{url} rejected request '{request.key}': {problem}; "
                        "not retried: fix the request or the backend settings (model, api key)"
                    )
                wait = _retry_after(response)
            if attempt < tries:
                if wait is None:
                    wait = self.backoff * 2 ** (attempt - 1) + random.uniform(0, self.backoff)
                await asyncio.sleep(min(wait, MAX_WAIT))
        tried = f"{tries} {'try' if tries == 1 else 'tries'}"
        raise EndpointError(
            f"{url}: {problem} after {tried} (request '{request.key}'); "
            f"check the server is up and healthy, or lower concurrency (now {self.concurrency})"
        )

    def _parse(self, response: httpx.Response, url: str) -> Generation:
        try:
            body = response.json()
            choice = body["choices"][0]
            text = choice["message"].get("content")
            usage = body.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(
                f"{url} answered 200 but not with a chat completion "
                f"({_one_line(response.text)[:200]!r}); is base_url an OpenAI-compatible /v1?"
            ) from None
        if not isinstance(text, str):  # null (a tool call, a refusal), a number, a list of parts
            raise EndpointError(
                f"{url} answered a message content that is not text ({type(text).__name__} "
                f"{_one_line(repr(text))[:60]}); is base_url an OpenAI-compatible chat endpoint?"
            )
        return Generation(
            text=text,
            # 0 when a server reports no usage: counts are bookkeeping, not worth failing over
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=str(choice.get("finish_reason") or "unknown"),
            extra={"model": body.get("model", self.model)},
        )


def _run_loop(loop: asyncio.AbstractEventLoop, task: asyncio.Task) -> None:
    try:
        loop.run_until_complete(task)
    except BaseException:  # the task reports its outcome (or was cancelled) through the queue
        pass
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _chat_url(base_url: str) -> str:
    """`{base_url}/chat/completions`, the path appended before any query the base URL has."""
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "no details"


def _server_message(response: httpx.Response) -> str:
    """The server's own error message (OpenAI puts it in error.message), on one short line."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return _one_line(str(message or response.text or response.reason_phrase))[:300]


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
