"""`potstill.redact`: what it masks, what it leaves alone, and the openai backend's use of it."""

from __future__ import annotations

import pytest

from potstill.redact import add_secret, redact, redact_data
from potstill.teacher.openai_backend import EndpointError, OpenAIBackend, _chat_url


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("http://user:pw-1234@host:8000/v1", "http://***@host:8000/v1"),
        ("https://sk-onlyuser@host/v1", "https://***@host/v1"),
        ("https://h/v1?api_key=abc123&x=1", "https://h/v1?api_key=***&x=1"),
        ("https://h/v1?x=1&key=AIzaSy0;y=2", "https://h/v1?x=1&key=***;y=2"),
        ("https://h/v1?access_token=t0k&api-key=k3y", "https://h/v1?access_token=***&api-key=***"),
        ("got Authorization: Bearer abcdefgh123 from you", "got Authorization: *** from you"),
        ('{"authorization": "Basic dXNlcjpwdw=="}', '{"authorization": "***"}'),
        ("x-api-key=abcdef12, next", "x-api-key=***, next"),
        ("token Bearer abcdefghijkl.mn", "token Bearer ***"),
        ("leaked sk-proj-AbCdEfGhIjKlMnOpQr here", "leaked *** here"),
    ],
)
def test_redact_masks_credentials(text, masked):
    assert redact(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "rg:basic_arithmetic?size=3&seed=1",
        "api_key_env: OPENAI_API_KEY",
        "the openai backend reads its API key from $OPENAI_API_KEY, which is not set",
        "Use basic arithmetic; the bearer of bad news",
        "http://127.0.0.1:8000/v1/chat/completions",
        "user@example.com wrote: 3 + 4 = 7",
    ],
)
def test_redact_leaves_plain_text_alone(text):
    assert redact(text) == text


def test_secrets_read_are_scrubbed_everywhere_but_short_ones_are_not():
    add_secret("env-secret-value-42")
    add_secret("EMPTY")  # vLLM's placeholder key: masking the word would garble every message
    data = {"a": ["x env-secret-value-42 y", ("env-secret-value-42",)], "n": 3, "e": "EMPTY"}
    assert redact_data(data) == {"a": ["x *** y", ("***",)], "n": 3, "e": "EMPTY"}


def test_openai_backend_describes_and_raises_without_the_url_key(monkeypatch):
    monkeypatch.setenv("POTSTILL_REDACT_TEST_KEY", "sk-env-Zx81Qw72Er63Ty54")
    url = "http://bob:hunter2-secret@127.0.0.1:9/v1?api_key=q-123456"
    backend = OpenAIBackend(url, "m", api_key_env="POTSTILL_REDACT_TEST_KEY")
    assert (
        backend.url == "http://bob:hunter2-secret@127.0.0.1:9/v1/chat/completions?api_key=q-123456"
    )
    assert backend.describe()["base_url"] == "http://***@127.0.0.1:9/v1?api_key=***"
    assert "hunter2" not in repr(backend) and "q-123456" not in repr(backend)
    error = EndpointError(f"{backend.url}: HTTP 401 (bad key Bearer sk-env-Zx81Qw72Er63Ty54)")
    assert str(error) == (
        "http://***@127.0.0.1:9/v1/chat/completions?api_key=***: HTTP 401 (bad key Bearer ***)"
    )
    assert _chat_url("http://h/v1/") == "http://h/v1/chat/completions"


def test_a_dumped_config_masks_the_url_key_and_keeps_the_rest():
    from potstill.config import dump_yaml, load_config
    from potstill.stages.generate import GenerateConfig

    keyed = "http://user:sk-dump-Qw12Er34Ty56Ui78@127.0.0.1:8000/v1?api_key=q-abcdef"
    cfg = load_config(GenerateConfig, overrides=[f"backend.openai.base_url={keyed}"])
    assert cfg.backend.openai.base_url == keyed  # the backend still gets the real URL
    text = dump_yaml(cfg)
    assert "base_url: http://***@127.0.0.1:8000/v1?api_key=***" in text
    assert "sk-dump" not in text and "q-abcdef" not in text
    assert "api_key_env: OPENAI_API_KEY" in text
