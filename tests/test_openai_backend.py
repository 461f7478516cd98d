"""The openai backend against a real HTTP server (`potstill.teacher.serve`) over the tiny HF
model; the faults it must survive are injected by the test-side subclass in `faulty_serve`."""

from __future__ import annotations

import time

import httpx
import pytest

from potstill.errors import ConfigError
from potstill.teacher.backends import Request, Sampling
from potstill.teacher.hf_backend import HFBackend
from potstill.teacher.openai_backend import EndpointError, OpenAIBackend

from .conftest import build_model, build_tokenizer
from .faulty_serve import start_faulty_server

KEY = "sk-test-0123456789abcdef"
GREEDY = Sampling(max_new_tokens=8)
PROMPTS = [
    "What is 17 + 25?",
    "Calculate 5 - 3 - 6.",
    "Let's think step by step.",
    "question solution answer explanation teacher student",
    "7",
]


def requests(n: int = len(PROMPTS), seed: int = 0) -> list[Request]:
    return [
        Request(
            key=f"r{i}",
            messages=({"role": "user", "content": PROMPTS[i % len(PROMPTS)]},),
            seed=seed + i,
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def hf_backend():
    tokenizer = build_tokenizer()
    return HFBackend(build_model(tokenizer), tokenizer, batch_size=4, model_id="tiny")


@pytest.fixture
def serve(hf_backend):
    """Start a server over the tiny model (closed after the test): serve(faults=..., api_key=..)."""
    servers = []

    def start(**kwargs):
        server, url = start_faulty_server(hf_backend, model_name="tiny", **kwargs)
        servers.append(server)
        return server, url

    yield start
    for server in servers:
        server.close()


def client(url: str, **kwargs) -> OpenAIBackend:
    settings = {"api_key_env": None, "timeout": 10.0, "max_retries": 3, "backoff": 0.01}
    return OpenAIBackend(url, "tiny", **{**settings, **kwargs})


def by_key(pairs) -> dict:
    return {request.key: generation for request, generation in pairs}


def test_greedy_over_http_equals_direct(serve, hf_backend):
    asked = [*requests(), Request("prefilled", ({"role": "user", "content": "7"},), prefill="The")]
    direct = by_key(hf_backend.generate(asked, GREEDY))
    _, url = serve()
    via_http = by_key(client(url, concurrency=3).generate(asked, GREEDY))
    assert via_http.keys() == direct.keys()
    for key, expected in direct.items():
        got = via_http[key]
        assert (got.text, got.prompt_tokens, got.completion_tokens, got.finish_reason) == (
            expected.text,
            expected.prompt_tokens,
            expected.completion_tokens,
            expected.finish_reason,
        ), key
        assert got.extra["model"] == "tiny"


def test_stop_strings_over_http_equal_direct(serve, hf_backend):
    asked = requests()
    plain = by_key(hf_backend.generate(asked, GREEDY))
    text = max((g.text for g in plain.values()), key=len)
    stop = Sampling(max_new_tokens=8, stop=(text[len(text) // 2 :][:2],))
    direct = by_key(hf_backend.generate(asked, stop))
    _, url = serve()
    via_http = by_key(client(url, concurrency=2).generate(asked, stop))
    assert {k: (g.text, g.finish_reason) for k, g in via_http.items()} == {
        k: (g.text, g.finish_reason) for k, g in direct.items()
    }
    assert any(g.text != plain[k].text for k, g in direct.items())  # the stop string cut one


def test_seed_passes_through(serve, hf_backend):
    hot = Sampling(max_new_tokens=12, temperature=1.0)
    _, url = serve()
    backend = client(url, concurrency=2)
    first = by_key(backend.generate(requests(3, seed=7), hot))
    again = by_key(backend.generate(requests(3, seed=7), hot))
    other = by_key(backend.generate(requests(3, seed=1000), hot))
    direct = by_key(hf_backend.generate(requests(3, seed=7), hot))
    assert [g.text for g in first.values()] == [again[k].text for k in first]
    assert [g.text for g in first.values()] == [direct[k].text for k in first]
    assert [g.text for g in first.values()] != [other[k].text for k in first]


def test_429_then_success_honours_retry_after(serve):
    server, url = serve(faults=[{"status": 429, "retry_after": 0.3}])
    start = time.monotonic()
    results = list(client(url).generate(requests(1), GREEDY))
    assert len(results) == 1 and results[0][1].completion_tokens > 0
    assert time.monotonic() - start >= 0.3  # waited what the server asked, not the tiny backoff
    assert server.stats.requests == 2


def test_server_error_on_every_try_is_one_line_error(serve):
    server, url = serve(faults=[{"status": 500}] * 3)
    with pytest.raises(EndpointError) as caught:
        list(client(url, max_retries=2).generate(requests(1), GREEDY))
    message = str(caught.value)
    assert "\n" not in message
    assert f"{url}/chat/completions" in message
    assert "HTTP 500" in message and "after 3 tries" in message and "concurrency" in message
    assert server.stats.requests == 3


def test_timeouts_and_dropped_connections_are_retried(serve):
    server, url = serve(faults=[{"delay": 2.0}, {"close": True}])
    results = list(client(url, timeout=1.0).generate(requests(1), GREEDY))
    assert len(results) == 1 and results[0][1].completion_tokens > 0
    assert server.stats.requests == 3


def test_bad_request_is_not_retried(serve):
    server, url = serve()
    too_long = Sampling(max_new_tokens=10_000)  # past the tiny model's 512-token context
    with pytest.raises(EndpointError, match="HTTP 400.*maximum context length is 512") as caught:
        list(client(url).generate(requests(1), too_long))
    assert "not retried" in str(caught.value)
    assert server.stats.requests == 1


def test_missing_api_key_env_is_a_config_error(monkeypatch):
    monkeypatch.delenv("POTSTILL_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"export POTSTILL_TEST_KEY=.*api_key_env: null"):
        OpenAIBackend("http://127.0.0.1:1/v1", "tiny", api_key_env="POTSTILL_TEST_KEY")
    monkeypatch.setenv("POTSTILL_TEST_KEY", "")
    with pytest.raises(ConfigError, match="POTSTILL_TEST_KEY"):
        OpenAIBackend("http://127.0.0.1:1/v1", "tiny", api_key_env="POTSTILL_TEST_KEY")


def test_api_key_reaches_the_server_and_nothing_else(serve, monkeypatch):
    server, url = serve(api_key=KEY)
    monkeypatch.setenv("POTSTILL_TEST_KEY", KEY)
    keyed = client(url, api_key_env="POTSTILL_TEST_KEY")
    assert len(list(keyed.generate(requests(2), GREEDY))) == 2
    assert KEY not in repr(keyed) and KEY not in str(keyed.describe())
    assert keyed.describe() == {"backend": "openai", "base_url": url, "model": "tiny"}

    with pytest.raises(EndpointError, match="HTTP 401") as caught:
        list(client(url).generate(requests(1), GREEDY))  # no key sent
    assert server.stats.requests == 3  # 401 is not retried

    monkeypatch.setenv("POTSTILL_TEST_KEY", "sk-wrong-key")
    with pytest.raises(EndpointError, match="HTTP 401") as caught:
        list(client(url, api_key_env="POTSTILL_TEST_KEY").generate(requests(1), GREEDY))
    assert "sk-wrong-key" not in str(caught.value) and KEY not in str(caught.value)


def test_concurrency_limit_is_respected(serve):
    server, url = serve(faults=[{"delay": 0.15}] * 8)
    results = list(client(url, concurrency=2).generate(requests(8), GREEDY))
    assert sorted(r.key for r, _ in results) == sorted(r.key for r in requests(8))
    assert server.stats.peak_in_flight == 2


def test_results_before_a_failure_are_yielded_first(serve):
    _, url = serve(faults=[{}, {}, {"status": 500}])
    seen = []
    with pytest.raises(EndpointError, match=r"HTTP 500 \(.*\) after 1 try "):
        for request, _ in client(url, concurrency=1, max_retries=0).generate(requests(4), GREEDY):
            seen.append(request.key)
    assert seen == ["r0", "r1"]


def test_stopping_early_cancels_the_rest(serve):
    # Each later request takes 4 s: waiting for even one of them would take >= 4 s, so a bound
    # of 3 s tells the two apart with room for a loaded machine (1.0 s failed at load 7).
    server, url = serve(faults=[{}] + [{"delay": 4.0}] * 4)
    start = time.monotonic()
    generation = client(url, concurrency=1).generate(requests(5), GREEDY)
    first, _ = next(generation)
    generation.close()  # a caller that stops reading must not wait for the remaining requests
    assert first.key == "r0" and time.monotonic() - start < 3.0


def test_server_speaks_openai_errors_and_models(serve):
    server, url = serve()
    models = httpx.get(f"{url}/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 512
    bad = httpx.post(f"{url}/chat/completions", content=b"{not json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    wrong_model = httpx.post(
        f"{url}/chat/completions",
        json={"model": "other", "messages": [{"role": "user", "content": "7"}]},
    )
    assert wrong_model.status_code == 404
    reply = httpx.post(
        f"{url}/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "7"}], "max_tokens": 3},
    ).json()
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"]
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
