"""`potstill.teacher.serve` with faults, for tests: the real server over a real backend, whose
next chat requests misbehave in the order given, then are served normally. A fault is
`{"status": 429, "retry_after": 0.1}` (that error reply, with a Retry-After header if given),
`{"delay": 2.0}` (wait, then serve normally: a client timeout), `{"close": True}` (drop the
connection unanswered) or `{}` (serve normally). `server.stats` counts the chat requests seen
(faulted ones included) and the peak number in flight.

The faults live here, not in `potstill.teacher.serve`: the product ships no hooks for misbehaving.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

from potstill.teacher.backends import Backend
from potstill.teacher.serve import ChatHandler, ChatServer
from potstill.teacher.serve_protocol import RequestError


@dataclass
class ServerStats:
    requests: int = 0
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


class FaultyHandler(ChatHandler):
    server: FaultyServer

    def _chat(self, body: bytes) -> tuple[int, dict, dict]:
        stats = self.server.stats
        stats.enter()
        try:
            return self._faulty_chat(body)
        finally:  # before the reply goes out: a client may send its next request at once
            stats.leave()

    def _faulty_chat(self, body: bytes) -> tuple[int, dict, dict]:
        fault = self.server.next_fault()
        time.sleep(fault.get("delay", 0))
        if fault.get("close"):
            # the client sees its connection end unanswered; the reply then sent into the shut
            # socket fails quietly, as it does for a client that went away
            self.connection.shutdown(socket.SHUT_RDWR)
            return 500, RequestError(500, "dropped", "server_error").body(), {}
        if "status" in fault:
            status = fault["status"]
            kind = "invalid_request_error" if status < 500 else "server_error"
            kind = "rate_limit_error" if status == 429 else kind
            headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
            return status, RequestError(status, "injected fault", kind).body(), headers
        return super()._chat(body)


class FaultyServer(ChatServer):
    handler_class = FaultyHandler

    def __init__(self, *args, faults: list[dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.faults = list(faults or [])
        self.faults_lock = threading.Lock()
        self.stats = ServerStats()

    def next_fault(self) -> dict:
        with self.faults_lock:
            return self.faults.pop(0) if self.faults else {}


def start_faulty_server(
    backend: Backend, *, faults: list[dict] | None = None, **kwargs
) -> tuple[FaultyServer, str]:
    """Like `potstill.teacher.serve.start_server` on 127.0.0.1, with `faults` for the next
    requests."""
    server = FaultyServer(("127.0.0.1", 0), backend, faults=faults, **kwargs)
    return server, server.start()
