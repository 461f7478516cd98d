"""A small OpenAI-compatible server over any `Backend`: `potstill serve MODEL --port 8000`.

Endpoints: `GET /v1/models` and `POST /v1/chat/completions` (non-streaming; honours max_tokens,
temperature, top_p, stop, seed, n=1 and vLLM's `continue_final_message`, which pre-fills the
assistant turn with the final assistant message). Errors are OpenAI-style JSON:
`{"error": {"message", "type", "param", "code"}}`, 400 for a bad request, 401 for a wrong key.

One thread owns the backend. Requests that arrive while it is busy are gathered and handed to
the backend together (grouped by sampling settings), so concurrent clients share batches. Each
request keeps its own seed, so a sample does not depend on which batch it landed in.

For tests, `start_server(..., faults=[...])` makes the next chat requests misbehave, in order:
`{"status": 429, "retry_after": 0.1}` (an error reply, with a Retry-After header if given),
`{"delay": 2.0}` (wait, then serve normally: a client timeout), `{"close": True}` (drop the
connection unanswered), `{}` (serve normally); then normal service. `server.stats` counts the
chat requests seen and the peak number in flight.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from potstill.errors import ConfigError, PotstillError
from potstill.teacher.backends import Backend, Sampling
from potstill.teacher.serve_protocol import ChatJob, RequestError, parse_chat_request, unauthorized

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""Completion budget when a client gives none and the backend does not know its context length."""
MAX_BODY = 32 * 2**20


@dataclass
class ServerStats:
    requests: int = 0
    """Chat completion requests received (faulted ones included)."""
    in_flight: int = 0
    peak_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def enter(self) -> None:
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1


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
        while (job := self.jobs.get()) is not None:
            batch = [job]
            while len(batch) < self.max_batch:  # everything that queued up while we were busy
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._serve(batch)
                    return
                batch.append(job)
            self._serve(batch)

    def _serve(self, jobs: list[ChatJob]) -> None:
        groups: dict[Sampling, list[ChatJob]] = defaultdict(list)
        for job in jobs:
            try:
                groups[self._sampling(job)].append(job)
            except RequestError as exc:
                job.finish(error=exc)
        for sampling, group in groups.items():
            by_key = {job.request.key: job for job in group}
            try:
                for request, generation in self.backend.generate(
                    [job.request for job in group], sampling
                ):
                    by_key.pop(request.key).finish(generation)
            except Exception as exc:
                logger.exception("generation failed")
                error = RequestError(
                    500, f"generation failed: {type(exc).__name__}", "server_error"
                )
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


class ChatServer(ThreadingHTTPServer):
    """An HTTP server answering OpenAI chat completions with `backend`."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        backend: Backend,
        *,
        model_name: str,
        api_key: str | None = None,
        faults: list[dict] | None = None,
    ):
        super().__init__(address, _Handler)
        self.backend = backend
        self.model_name = model_name
        self._api_key = api_key
        self.faults = list(faults or [])
        self.faults_lock = threading.Lock()
        self.stats = ServerStats()
        self.started = int(time.time())
        self.batcher = _Batcher(backend)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def inject(self, *faults: dict) -> None:
        """Queue more faults for the next chat requests."""
        with self.faults_lock:
            self.faults.extend(faults)

    def next_fault(self) -> dict | None:
        with self.faults_lock:
            return self.faults.pop(0) if self.faults else None

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

    def server_close(self) -> None:
        super().server_close()
        if hasattr(self, "batcher"):  # TCPServer.__init__ calls this when binding fails
            self.batcher.close()

    def close(self) -> None:
        """Stop serving (the thread `start_server` started, if any) and release the port."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __exit__(self, *_):
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections
    timeout = 600  # drop a connection idle this long
    server: ChatServer

    def log_message(self, format, *args):
        logger.info("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._read_body()
        if _route(self.path) != "/models":
            return self._send(*_error(RequestError(404, f"no route {self.path}", code="not_found")))
        if not self.server.authorized(self.headers.get("Authorization")):
            return self._send(*_error(unauthorized()))
        self._send(200, self.server.models())

    def do_POST(self):
        body = self._read_body()
        if body is None:
            return self._send(*_error(RequestError(413, f"body over {MAX_BODY} bytes")))
        if _route(self.path) != "/chat/completions":
            return self._send(*_error(RequestError(404, f"no route {self.path}", code="not_found")))
        stats = self.server.stats
        stats.enter()
        try:
            reply = self._chat(body)
        finally:  # before the reply goes out: a client may send its next request at once
            stats.leave()
        if reply is None:
            self.close_connection = True
            return
        self._send(*reply)

    def _chat(self, body: bytes) -> tuple[int, dict, dict] | None:
        fault = self.server.next_fault() or {}
        time.sleep(fault.get("delay", 0))
        if fault.get("close"):
            return None
        if "status" in fault:
            headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
            status = fault["status"]
            kind = "invalid_request_error" if status < 500 else "server_error"
            kind = "rate_limit_error" if status == 429 else kind
            return _error(RequestError(status, "injected fault", kind), headers)
        if not self.server.authorized(self.headers.get("Authorization")):
            return _error(unauthorized())
        try:
            job = parse_chat_request(body, self.server.model_name)
            self.server.batcher.submit(job)
        except RequestError as exc:
            return _error(exc)
        job.done.wait()
        if job.error is not None:
            return _error(job.error)
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
        completion = {
            "id": job.request.key,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.server.model_name,
            "choices": [choice],
            "usage": usage,
        }
        return 200, completion, {}

    def _read_body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True  # the unread body would garble the next request
            return None
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. timed out)
            self.close_connection = True


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
    faults: list[dict] | None = None,
) -> tuple[ChatServer, str]:
    """Serve `backend` from a daemon thread; returns the server and its base URL (`.../v1`).

    Port 0 picks a free port. Stop it with `server.close()`.
    """
    server = _bind(host, port, backend, model_name=model_name, api_key=api_key, faults=faults)
    server._thread = threading.Thread(
        target=server.serve_forever, name="potstill-serve", daemon=True
    )
    server._thread.start()
    return server, server.url


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
