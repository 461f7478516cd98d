"""A minimal OpenAI-compatible chat-completions server on http.server, for subprocess tests.

Unlike `potstill.teacher.serve` it needs no model, and `mode` switches its behaviour between
requests: "ok" answers, an int answers that HTTP status every time, "slow" sleeps past any small
timeout, "hold" answers once `release` is set, "echo_auth" refuses with a 401 quoting the
Authorization header and the path it got (as careless servers do). Setting `content` (a number,
None, a list...) answers that as the message content.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = object()
"""`content` default: answer "Answer to: <question>"."""


class FakeOpenAI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode: str | int = "ok"
        self.slow_seconds = 3.0
        self.release = threading.Event()
        self.requests = 0
        self.auth_headers: list[str | None] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.content: object = ANSWER

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up on a slow answer closes the socket: expected here


class _Handler(BaseHTTPRequestHandler):
    server: FakeOpenAI

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        server.requests += 1
        server.auth_headers.append(self.headers.get("Authorization"))
        if server.mode == "slow":
            time.sleep(server.slow_seconds)
        if server.mode == "hold":
            server.release.wait(60)
        if server.mode == "echo_auth":
            auth = self.headers.get("Authorization")
            reply = {"error": {"message": f"bad key in Authorization: {auth} for {self.path}"}}
            self._send(401, reply)
            return
        if isinstance(server.mode, int):
            reply = {"error": {"message": f"fake status {server.mode}", "type": "fake"}}
            self._send(server.mode, reply, {"Retry-After": "0"} if server.mode == 429 else {})
            return
        question = body["messages"][-1]["content"]
        content = f"Answer to: {question}" if server.content is ANSWER else server.content
        reply = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
        }
        self._send(200, reply)

    def _send(self, status: int, reply: dict, headers: dict | None = None) -> None:
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)


@contextlib.contextmanager
def fake_openai() -> Iterator[FakeOpenAI]:
    """A running FakeOpenAI on a free local port, shut down afterwards."""
    server = FakeOpenAI()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
