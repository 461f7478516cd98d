"""`potstill serve` keeps serving whatever a client sends: each broken or hostile request gets its
own error reply (OpenAI-style JSON), and the next good request is served. A real server on
127.0.0.1 over a real tiny model; real HTTP clients (httpx, and `http.client`'s response parser
over a raw socket where the request itself must be malformed)."""

from __future__ import annotations

import http.client
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from potstill.teacher.hf_backend import HFBackend
from potstill.teacher.serve import MAX_BODY, start_server

from .conftest import CHATML, build_model, build_tokenizer, kill_group

REFUSING = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{% endfor %}" + CHATML
)
"""ChatML that refuses a system turn and turns out of order, as e.g. Gemma's template does. A
system turn is folded into the first user turn (`render_chat`) and served; two user turns in a
row are refused whatever potstill does."""
KNOWN_TOKENS = 300
"""The model's embedding covers the tokenizer's first 300 of 320 tokens (a vocabulary mismatch),
so a prompt holding one of the last 20 fails inside the model: a real backend failure."""
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "7"}], "max_tokens": 3}
REFUSED = {**GOOD, "messages": [*GOOD["messages"], *GOOD["messages"]]}
SYSTEM = {**GOOD, "messages": [{"role": "system", "content": "Be brief."}, *GOOD["messages"]]}
FAILING = {**GOOD, "messages": [{"role": "user", "content": "teacher student"}]}  # ids 300+


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = REFUSING
    model = build_model(tokenizer)
    model.resize_token_embeddings(KNOWN_TOKENS)
    path = tmp_path_factory.mktemp("hostile-tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, HFBackend(model, tokenizer, batch_size=4, model_id="tiny")


@pytest.fixture
def serve(model_dir):
    """serve(**start_server kwargs) -> base URL; the servers close after the test."""
    servers = []

    def start(**kwargs) -> str:
        server, url = start_server(model_dir[1], model_name="tiny", **kwargs)
        servers.append(server)
        return url

    yield start
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def no_tracebacks(capfd, caplog):
    """None of this prints a traceback, nor logs one above debug level."""
    yield
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err
    records = caplog.get_records("call")
    loud = [r for r in records if r.exc_info and r.levelno > logging.DEBUG]
    assert not loud, [r.getMessage() for r in loud]


def chat(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", json=body, timeout=30)


def assert_serves(url: str) -> None:
    reply = chat(url, GOOD)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"


def assert_openai_error(status: int, body: bytes, expected: int, *fragments: str) -> dict:
    assert status == expected, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("server_error" if expected >= 500 else "invalid_request_error")
    for fragment in fragments:
        assert fragment in error["message"]
    return error


def raw_exchange(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict, bytes]:
    """Send `head` (the request line and headers, as given) and `body`; the parsed reply."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        return read_reply(sock)


def read_reply(sock: socket.socket) -> tuple[int, dict, bytes]:
    reply = http.client.HTTPResponse(sock)
    reply.begin()
    return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()


def post_head(*headers: str) -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", *headers]
    return "\r\n".join(lines).encode()


def test_a_request_the_template_refuses_is_a_400_and_the_rest_are_served(serve):
    url = serve()
    with ThreadPoolExecutor(6) as pool:  # refused and good requests at once: may share a batch
        replies = list(pool.map(lambda body: chat(url, body), [REFUSED, GOOD] * 3))
    for refused in replies[::2]:
        assert_openai_error(
            refused.status_code, refused.content, 400, "chat template", "roles must alternate"
        )
    assert [reply.status_code for reply in replies[1::2]] == [200] * 3
    assert_serves(url)
    assert chat(url, SYSTEM).status_code == 200  # the system turn the template refuses: folded


class UncountedBackend(HFBackend):
    """The HF backend as the vLLM one behaves: no prompt lengths, so the chat template first
    runs inside `generate`, for the whole batch."""

    def prompt_tokens(self, request):
        return None


def test_a_refusal_inside_generate_is_a_400_alone_and_a_500_in_a_batch(model_dir):
    backend = model_dir[1]
    server, url = start_server(
        UncountedBackend(backend.model, backend.tokenizer, model_id="tiny"), model_name="tiny"
    )
    try:
        alone = chat(url, REFUSED)
        assert_openai_error(alone.status_code, alone.content, 400, "roles must alternate")
        with ThreadPoolExecutor(4) as pool:  # whichever share a batch with a refused one fail
            replies = list(pool.map(lambda body: chat(url, body), [REFUSED, GOOD] * 2))
        assert {reply.status_code for reply in replies} <= {200, 400, 500}
        assert all(reply.status_code != 200 for reply in replies[::2])
        assert_serves(url)
    finally:
        server.close()


def test_a_backend_failure_is_a_500_for_its_requests_and_the_server_goes_on(serve):
    url = serve()
    for _ in range(2):  # the model thread survives the first
        failed = chat(url, FAILING)
        error = assert_openai_error(failed.status_code, failed.content, 500, "generation failed")
        assert error["message"] == "generation failed: IndexError"  # no server internals
        assert_serves(url)


@pytest.mark.parametrize(
    ("headers", "status", "fragment"),
    [
        (["Content-Length: -1"], 400, "'-1'"),
        (["Content-Length: abc"], 400, "'abc'"),
        (["Content-Length: 1e3"], 400, "'1e3'"),
        (["Content-Length: +5"], 400, "'+5'"),
        (["Content-Length: 5", "Content-Length: 6"], 400, "'5, 6'"),
        ([], 411, "Content-Length"),
        (["Transfer-Encoding: chunked"], 411, "Content-Length"),
        ([f"Content-Length: {MAX_BODY + 1}"], 413, str(MAX_BODY)),
    ],
)
def test_a_bad_content_length_gets_its_4xx_and_the_server_goes_on(serve, headers, status, fragment):
    url = serve()
    got, reply_headers, body = raw_exchange(url, post_head(*headers), b'{"model": "tiny"}')
    assert_openai_error(got, body, status, fragment)
    assert reply_headers["connection"] == "close"  # the body's end is unknown: no next request
    assert_serves(url)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /v1/models NOTHTTP/1.1", 400),
        (b"PUT /v1/models HTTP/1.1\r\nHost: 127.0.0.1", 501),
        ("\r\n".join(["GET / HTTP/1.1", *(f"X-{i}: y" for i in range(101))]).encode(), 431),
    ],
)
def test_http_servers_own_refusals_are_openai_json_too(serve, head, status):
    url = serve()
    got, _, body = raw_exchange(url, head)
    assert_openai_error(got, body, status)
    assert_serves(url)


def test_a_stalled_body_is_cut_off_after_the_request_timeout(serve):
    url = serve(request_timeout=0.5)
    start = time.monotonic()
    got, _, body = raw_exchange(url, post_head("Content-Length: 100"), b'{"model": ')
    assert 0.4 < time.monotonic() - start < 5
    assert_openai_error(got, body, 408, "0.5 s")
    assert_serves(url)


def test_a_trickled_body_is_cut_off_at_the_same_deadline(serve):
    """A byte every 0.3 s never lets a 1 s socket timeout fire: the deadline is for the body."""
    url = serve(request_timeout=1.0)
    address = urlsplit(url)
    start = time.monotonic()
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(post_head("Content-Length: 100") + b"\r\n\r\n{")
        # send on until the server answers: stopping at once leaves no byte of ours unread there
        while not select.select([sock], [], [], 0.3)[0] and time.monotonic() - start < 10:
            sock.sendall(b" ")
        got, _, body = read_reply(sock)
    assert time.monotonic() - start < 3
    assert_openai_error(got, body, 408)
    assert_serves(url)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"[" * 100_000, "not valid JSON"),  # nested past Python's recursion limit
        (json.dumps({**GOOD, "seed": 2**64}).encode(), "seed"),  # the batch's torch seeding fails
    ],
)
def test_hostile_json_is_a_400_and_the_server_goes_on(serve, content, fragment):
    url = serve()
    reply = httpx.post(f"{url}/chat/completions", content=content, timeout=30)
    assert_openai_error(reply.status_code, reply.content, 400, fragment)
    assert_serves(url)


def test_the_potstill_serve_command_prints_no_traceback(model_dir):
    """The real CLI, where warnings reach stderr: one line each at most, never a traceback."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("POTSTILL_DEBUG", None)
    command = [sys.executable, "-m", "potstill", "serve", str(model_dir[0]), "--port", "0"]
    proc = subprocess.Popen(
        [*command, "--model-name", "tiny"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()  # "serving tiny at http://127.0.0.1:PORT/v1 (Ctrl-C stops)"
        assert "serving tiny at" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split(" at ", 1)[1].split()[0]
        assert chat(url, REFUSED).status_code == 400
        assert chat(url, FAILING).status_code == 500
        assert raw_exchange(url, post_head("Content-Length: -1"))[0] == 400
        assert raw_exchange(url, post_head("Content-Length: abc"))[0] == 400
        assert raw_exchange(url, b"GET / NOTHTTP/1.1")[0] == 400
        assert_serves(url)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        kill_group(proc)
    assert "Traceback" not in err, err
    assert err.count("\n") <= 1, err  # the one warning line for the backend failure
