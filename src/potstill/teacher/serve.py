"""A small OpenAI-compatible server over any `Backend`: `potstill serve MODEL --port 8000`.

Endpoints: `GET /v1/models` and `POST /v1/chat/completions` (non-streaming; honours max_tokens,
temperature, top_p, stop, seed, n=1 and vLLM's `continue_final_message`, which pre-fills the
assistant turn with the final assistant message). Errors are OpenAI-style JSON:
`{"error": {"message", "type", "param", "code"}}`, 400 for a bad request, 401 for a wrong key.

One thread owns the backend. Requests that arrive while it is busy are gathered and handed to
the backend together (grouped by sampling settings), so concurrent clients share batches. Each
request keeps its own seed, so a sample does not depend on which batch it landed in.

Whatever a client sends, the server answers it and goes on serving: a malformed or oversized
request gets its 4xx, a request the chat template refuses a 400, a backend failure a 500 for the
requests of that batch alone; a client that stalls mid-request is cut off after `request_timeout`
seconds (408). None of these prints a traceback (they are logged at debug level).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from potstill.errors import ConfigError, PotstillError
from potstill.teacher.backends import Backend, Sampling
from potstill.teacher.serve_protocol import (
    ChatJob,
    RequestError,
    backend_failure,
    body_length,
    completion,
    parse_chat_request,
    unauthorized,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""Completion budget when a client gives none and the backend does not know its context length."""
MAX_BODY = 32 * 2**20
"""Largest request body taken (413 beyond)."""
REQUEST_TIMEOUT = 60.0
"""Seconds a client has to send a request's body (and the longest silence on a connection)."""


class _Batcher:
    """The one thread that calls the backend (models and tokenizers are not thread-safe)."""

    def __init__(self, backend: Backend, max_batch: int = 256):
        self.backend = backend
        self.max_batch = max_batch
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="potstill-serve-model", daemon=True)
        self.thread.start()

    def submit(self, job: ChatJob) -> None:
        with self.lock:  # with close(): every job submitted is queued before the stop marker
            if self.closed:
                raise RequestError(503, "the server is shutting down", "server_error")
            self.jobs.put(job)

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.jobs.put(None)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self.jobs.get()]
            while batch[-1] is not None and len(batch) < self.max_batch:
                try:  # everything that queued up while we were busy
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None
            if stop:
                batch.pop()
            try:
                self._serve(batch)
            except Exception as exc:  # a bug of ours: fail this batch, not every later request
                error = backend_failure(exc, "serving", one_request=False)
                for job in batch:
                    if not job.done.is_set():
                        job.finish(error=error)

    def _serve(self, jobs: list[ChatJob]) -> None:
        groups: dict[Sampling, list[ChatJob]] = defaultdict(list)
        for job in jobs:
            try:
                groups[self._sampling(job)].append(job)
            except RequestError as exc:
                job.finish(error=exc)
            except Exception as exc:  # rendering this request's prompt failed: it alone fails
                job.finish(error=backend_failure(exc, "rendering the prompt"))
        for sampling, group in groups.items():
            by_key = {job.request.key: job for job in group}
            try:
                for request, generation in self.backend.generate(
                    [job.request for job in group], sampling
                ):
                    by_key.pop(request.key).finish(generation)
            except Exception as exc:  # the requests answered before it keep their answers
                error = backend_failure(exc, "generation", one_request=len(group) == 1)
                for job in by_key.values():
                    job.finish(error=error)

    def _sampling(self, job: ChatJob) -> Sampling:
        max_tokens = job.max_tokens
        prompt = self.backend.prompt_tokens(job.request)
        limit = self.backend.context_length
        if prompt is not None and limit is not None:
            room = limit - prompt
            if max_tokens is None:
                max_tokens = room
            if room <= 0 or max_tokens > room:
                raise RequestError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {prompt + max(max_tokens, 1)} tokens ({prompt} in the messages, "
                    f"{max(max_tokens, 1)} in the completion). Please reduce the length of the "
                    "messages or completion.",
                    code="context_length_exceeded",
                )
        return Sampling(
            max_new_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temperature=job.temperature,
            top_p=job.top_p,
            stop=job.stop,
        )


class ChatHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections
    server: ChatServer

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # applied to the socket by setup()
        super().setup()

    def log_message(self, format, *args):
        logger.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a garbled request line, too many headers, an unknown
        method) in JSON like ours; the connection closes, as after any unparsed request."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # a request line that did not parse says so
            self.request_version = "HTTP/1.1"  # and the reply would go without a status line
        kind = "server_error" if code >= 500 else "invalid_request_error"
        self._send(*_error(RequestError(code, message or self.responses[code][0], kind)))

    def do_GET(self):
        self._answer("/models", self._models)

    def do_POST(self):
        self._answer("/chat/completions", self._chat)

    def _answer(self, route: str, answer) -> None:
        try:
            body = self._read_body()
            if _route(self.path) != route:
                raise RequestError(404, f"no route {self.path}", code="not_found")
            reply = answer(body)
        except RequestError as exc:
            reply = _error(exc)
        self._send(*reply)

    def _models(self, body: bytes) -> tuple[int, dict, dict]:
        if not self.server.authorized(self.headers.get("Authorization")):
            raise unauthorized()
        return 200, self.server.models(), {}

    def _chat(self, body: bytes) -> tuple[int, dict, dict]:
        """One chat completion: (status, payload, headers), or RequestError."""
        if not self.server.authorized(self.headers.get("Authorization")):
            raise unauthorized()
        job = parse_chat_request(body, self.server.model_name)
        self.server.batcher.submit(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return 200, completion(job, self.server.model_name), {}

    def _read_body(self) -> bytes:
        """The request's body, exactly Content-Length bytes, or RequestError."""
        try:
            return self._read_exactly(body_length(self.headers, self.command, MAX_BODY))
        except RequestError:  # what is left of the body unread would be taken for the next request
            self.close_connection = True
            raise

    def _read_exactly(self, length: int) -> bytes:
        """`length` bytes within `request_timeout` seconds in all: a client that trickles its
        body a byte at a time must not hold this thread for longer than one that stalls."""
        deadline = time.monotonic() + self.server.request_timeout
        chunks: list[bytes] = []
        try:
            while length > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)
                if not (chunk := self.rfile.read1(min(length, 2**16))):
                    raise RequestError(400, "the connection closed before the whole body came")
                chunks.append(chunk)
                length -= len(chunk)
        except TimeoutError:
            seconds = self.server.request_timeout
            raise RequestError(408, f"the body did not arrive within {seconds:g} s") from None
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(chunks)

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timed out, reset) or stopped reading
            self.close_connection = True


class ChatServer(ThreadingHTTPServer):
    """An HTTP server answering OpenAI chat completions with `backend`.

    `request_timeout`: seconds a client has to send a request's body, and the longest silence
    taken on a connection (reading headers, or idle between requests), before it is dropped.
    """

    daemon_threads = True
    handler_class: type[ChatHandler] = ChatHandler

    def __init__(
        self,
        address: tuple[str, int],
        backend: Backend,
        *,
        model_name: str,
        api_key: str | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
    ):
        super().__init__(address, self.handler_class)
        self.backend = backend
        self.model_name = model_name
        self._api_key = api_key
        self.request_timeout = request_timeout
        self.started = int(time.time())
        self.batcher = _Batcher(backend)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> str:
        """Serve from a daemon thread (stop it with `close()`); returns the base URL."""
        self._thread = threading.Thread(
            target=self.serve_forever, name="potstill-serve", daemon=True
        )
        self._thread.start()
        return self.url

    def authorized(self, header: str | None) -> bool:
        if self._api_key is None:
            return True
        return hmac.compare_digest((header or "").encode(), f"Bearer {self._api_key}".encode())

    def models(self) -> dict:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "potstill",
            "max_model_len": self.backend.context_length,
        }
        return {"object": "list", "data": [card]}

    def handle_error(self, request, client_address) -> None:
        """An exception out of a handler (socketserver would print its traceback): a client
        that vanished mid-request is routine; anything else gets one line, the traceback at
        debug."""
        exc, client = sys.exception(), client_address[0]
        if not isinstance(exc, OSError):
            logger.warning("request from %s failed: %s: %s", client, type(exc).__name__, exc)
        logger.debug("request from %s failed", client, exc_info=exc)

    def server_close(self) -> None:
        super().server_close()
        if hasattr(self, "batcher"):  # TCPServer.__init__ calls this when binding fails
            self.batcher.close()

    def close(self) -> None:
        """Stop serving (the thread `start` started, if any) and release the port."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __exit__(self, *_):
        self.close()


def _route(path: str) -> str:
    path = path.split("?", 1)[0].rstrip("/")
    return path.removeprefix("/v1")


def _error(exc: RequestError, headers: dict | None = None) -> tuple[int, dict, dict]:
    return exc.status, exc.body(), headers or {}


def start_server(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    model_name: str,
    api_key: str | None = None,
    request_timeout: float = REQUEST_TIMEOUT,
) -> tuple[ChatServer, str]:
    """Serve `backend` from a daemon thread; returns the server and its base URL (`.../v1`).

    Port 0 picks a free port. Stop it with `server.close()`.
    """
    kwargs = {"model_name": model_name, "api_key": api_key, "request_timeout": request_timeout}
    server = _bind(host, port, backend, **kwargs)
    return server, server.start()


def serve_forever(
    backend: Backend, host: str, port: int, *, model_name: str, api_key: str | None = None
) -> None:
    """Serve `backend` in the foreground until Ctrl-C."""
    server = _bind(host, port, backend, model_name=model_name, api_key=api_key)
    print(f"serving {model_name} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_main(
    model_spec: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    batch_size: int = 8,
    *,
    model_name: str | None = None,
    api_key_env: str | None = None,
) -> None:
    """`potstill serve`: load a model (any spec `load_model` takes) and serve it over HTTP.

    Clients name it `model_name` (default: the spec). With `api_key_env`, clients must send the
    key held by that environment variable as a bearer token.
    """
    from potstill.models import load_model, load_tokenizer
    from potstill.teacher.hf_backend import HFBackend

    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env, "")
        if not api_key:
            raise ConfigError(f"${api_key_env} is not set: export the key clients must send")
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec)
    backend = HFBackend(model, tokenizer, batch_size=batch_size, model_id=model_spec)
    serve_forever(backend, host, port, model_name=model_name or model_spec, api_key=api_key)


def _bind(host: str, port: int, backend: Backend, **kwargs) -> ChatServer:
    try:
        return ChatServer((host, port), backend, **kwargs)
    except OSError as exc:
        raise PotstillError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another port or host"
        ) from None
