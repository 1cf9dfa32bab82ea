"""No secret, in any form, reaches anything an operator or a log collector can see.

A secret shows up in more shapes than its own: httpx quotes a bad header value as bytes
(`b'Bearer tok\\n'`), a careless server echoes `Authorization: Basic base64(tok:)`, a URL
carries it percent-encoded. The end-to-end test runs every command that prints against a
server that echoes every request header in its error bodies, and searches every output and
every row of the state store for every form of every secret.
"""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import pytest
from sqlalchemy import create_engine, select

from audience_sync.config import PlanhatConfig, RateLimit
from audience_sync.destinations import check_destination
from audience_sync.destinations.http import (
    ERROR_SNIPPET,
    HttpSender,
    Policy,
    RateLimiter,
    Redactor,
    Verdict,
    mask_url,
    probe,
)
from audience_sync.destinations.planhat import PlanhatApiDestination
from audience_sync.destinations.redact import url_secrets
from audience_sync.state import schema as t
from tests.daemon_harness import DaemonProcess, http_get, stop_all, wait_until
from tests.fakes import EchoServer, FakePlanhat
from tests.helpers import cli, make_warehouse, write_config

# File-mounted secrets end in a newline; `%` and `+` change under URL encoding.
TENANT_TOKEN = "tenant%41+SECRET/4f1d9a\n"
API_TOKEN = "api%2Ftok+SECRET-8c2e7b\n"
WRITE_KEY = "wk%25ey+SECRET=3b6a0c\n"
# In base_url, as written (percent-encoded): the proxy password and a query key.
PROXY_PASSWORD = "pr%2Bxy-SECRET-55e1"
QUERY_KEY = "qk%2Bey-SECRET-77f2"


def forms(secret: str, *, in_url: bool = False) -> set[str]:
    """Every shape a secret could be shown in, for the assertions (independent of redact.py);
    one written in a URL is also used percent-decoded (httpx decodes userinfo for Basic)."""
    found: set[str] = set()
    values = {secret, secret.strip()}
    if in_url:
        values |= {unquote(secret)}
    for value in values:
        raw = value.encode()
        found |= {value, repr(value)[1:-1], repr(raw)[2:-1], json.dumps(value)[1:-1],
                  quote(value, safe=""), quote(value), quote_plus(value),
                  base64.b64encode(raw).decode(), base64.b64encode(raw + b":").decode()}
    return found


ALL_FORMS = {form for secret in (TENANT_TOKEN, API_TOKEN, WRITE_KEY) for form in forms(secret)} \
    | {form for secret in (PROXY_PASSWORD, QUERY_KEY) for form in forms(secret, in_url=True)}


def leaks(text: str) -> list[str]:
    return sorted(form for form in ALL_FORMS if form in text)


# -- units --------------------------------------------------------------------------------

def test_redactor_removes_every_form_of_a_secret() -> None:
    redact = Redactor([API_TOKEN])
    for form in forms(API_TOKEN):
        assert "SECRET" not in redact(f"before {form} after"), form
    assert redact(f"Illegal header value {('Bearer ' + API_TOKEN).encode()!r}") == \
        "Illegal header value b'Bearer ***'"


def test_mask_url_hides_userinfo_and_query_values() -> None:
    url = f"http://proxy:{PROXY_PASSWORD}@host.example:8080/base?key={QUERY_KEY}&v=1#frag"
    assert mask_url(url) == "http://***@host.example:8080/base?key=***&v=***#***"
    assert mask_url("https://api.planhat.com") == "https://api.planhat.com"
    assert Redactor([])(f"cannot reach {url}: refused") == \
        "cannot reach http://***@host.example:8080/base?key=***&v=***#***: refused"
    assert leaks(Redactor(url_secrets(url))(f"echo {unquote(QUERY_KEY)} {PROXY_PASSWORD}")) \
        == []


def test_error_body_is_redacted_before_it_is_cut() -> None:
    """A token echoed across the 240-character cut: no prefix of it may survive."""
    token = "abcdefghij-SECRET-klmnopqrstuvwxyz-0123456"  # 42 characters
    with FakePlanhat(api_token=token).running() as fake:
        settings = PlanhatConfig.model_validate({
            "type": "planhat", "mode": "api", "api_token": token, "base_url": fake.url})
        destination = PlanhatApiDestination("planhat", settings)
        try:
            for start in range(ERROR_SNIPPET - 45, ERROR_SNIPPET + 2):
                body = json.dumps({"message": "x" * start + f"Bearer {token} end"}).encode()
                line = destination.sender.describe(400, body)
                assert "SECRET" not in line and token[:19] not in line, line
                assert len(line) <= ERROR_SNIPPET
        finally:
            destination.close()


def test_illegal_header_value_stops_the_destination_without_showing_the_token() -> None:
    """httpx refuses `Bearer tok\n` and quotes it: a configuration error (the destination
    stops for this run, its deliveries stay pending), never a retried network error."""
    with EchoServer().running() as echo:
        sender = HttpSender(
            "planhat", base_url=echo.url, auth=None,
            headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=2,
            policy=Policy(max_retries=5, backoff_base=0.01, backoff_max=0.1),
            limiter=RateLimiter(RateLimit(1000, 1)), redactor=Redactor([API_TOKEN]), pool=1)
        try:
            reply = sender.call("PUT", "/endusers", content=b"[]")
            status, said = probe(sender, "GET", "/endusers")
        finally:
            sender.close()
        assert echo.requests == 0
    assert reply.verdict is Verdict.HALT and reply.attempts == 1
    assert reply.error is not None and "cannot be sent" in reply.error
    assert status is None and "cannot be sent" in said
    assert leaks(reply.error + said) == []


# (A newline or NUL never gets this far: config load strips or refuses it, see test_config.)
@pytest.mark.parametrize("token", ["t\u00f6k-SECRET-1", "\u00e9\u00e9-SECRET-2"])
def test_token_a_header_cannot_carry_is_a_config_error_that_does_not_quote_it(
        token: str) -> None:
    settings = PlanhatConfig.model_validate({
        "type": "planhat", "mode": "api", "api_token": token, "base_url": "http://127.0.0.1:9"})
    ok, said = check_destination("planhat", settings)
    assert not ok and "cannot carry" in said
    assert "SECRET" not in said and leaks(said) == []


# -- every command, against an echoing server ---------------------------------------------

def _config(tmp_path: Path, state_url: str, echo_url: str) -> Path:
    host = echo_url.removeprefix("http://")
    proxied = f"http://proxy:{PROXY_PASSWORD}@{host}/base?key={QUERY_KEY}"
    keyed = f"{echo_url}/base?key={QUERY_KEY}"
    fast = {"timeout": 2, "max_retries": 1, "backoff_base": 0.001, "backoff_max": 0.01,
            "retry_later": 0, "rate_limit": "1000/s"}
    make_warehouse(tmp_path / "warehouse.db",
                   [(f"u{i}", f"u{i}@example.com", None, None, "c1", 50.0) for i in range(4)])
    destinations: dict[str, Any] = {
        "planhat": {"type": "planhat", "tenant_token": "${PLANHAT_TENANT_TOKEN}",
                    "base_url": proxied, **fast},
        # Without userinfo, and with it: the Bearer header goes, userinfo never replaces it.
        "planhat_api": {"type": "planhat", "mode": "api", "api_token": "${PLANHAT_API_TOKEN}",
                        "base_url": keyed, **fast},
        # With userinfo: the echo server sees the Bearer header (and the proxy key).
        "planhat_api_proxied": {"type": "planhat", "mode": "api",
                                "api_token": "${PLANHAT_API_TOKEN_STRIPPED}",
                                "base_url": proxied, **fast},
        # The same token as config load strips it (another layer does): sent, and echoed.
        "planhat_api_stripped": {"type": "planhat", "mode": "api",
                                 "api_token": "${PLANHAT_API_TOKEN_STRIPPED}",
                                 "base_url": keyed, **fast},
        "segment": {"type": "segment", "write_key": "${SEGMENT_WRITE_KEY}",
                    "base_url": proxied, **fast},
    }
    return write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "schedule": {"every": "1h", "jitter": "0s", "tick": "1s"},
        "sources": {"warehouse": {"url": f"sqlite:///{tmp_path / 'warehouse.db'}"}},
        "destinations": destinations,
        "audiences": [{"name": "Echoed", "source": "warehouse",
                       "destinations": list(destinations),
                       "query": "SELECT id AS user_id, email, company_id FROM users"}],
    })


def _dump_state(state_url: str) -> str:
    """Every row of every table of the state store, as text."""
    engine = create_engine(state_url)
    try:
        with engine.connect() as conn:
            return "\n".join(f"{table.name}: {row!r}"
                             for table in t.metadata.sorted_tables
                             for row in conn.execute(select(table)))
    finally:
        engine.dispose()


def _assert_clean(where: str, texts: Iterable[str]) -> None:
    text = "\n".join(texts)
    assert leaks(text) == [], f"{where} shows a secret"


@pytest.mark.slow
def test_no_form_of_any_secret_in_any_output_or_state_row(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANHAT_TENANT_TOKEN", TENANT_TOKEN)
    monkeypatch.setenv("PLANHAT_API_TOKEN", API_TOKEN)
    monkeypatch.setenv("PLANHAT_API_TOKEN_STRIPPED", API_TOKEN.strip())
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)
    with EchoServer().running() as echo:
        config = _config(tmp_path, state_url, echo.url)
        base = ("--config", str(config))
        outputs: list[str] = []
        commands = [("check",), ("sync",), ("sync", "--json"), ("status",),
                    ("status", "--json"), ("deliveries",), ("deliveries", "--json"),
                    ("deliveries", "--failed"), ("runs",), ("runs", "--json"),
                    ("retry",), ("sync", "--json"), ("deliveries", "--json"),
                    # Failed deliveries back to pending, for the daemon to send.
                    ("retry", "--queue-only")]
        for command in commands:
            code, out, err = cli(capsys, *base, "-v", *command)
            assert code != 2, (command, err)
            outputs.append(f"$ {' '.join(command)} -> {code}\n{out}\n{err}")
        # The echo server quoted the secrets (Basic, Bearer, URL), and the errors did reach
        # the outputs. (The userinfo of a base_url is never sent: each destination
        # authenticates with its own token.)
        quoted = "\n".join(echo.echoed)
        assert base64.b64encode(f"proxy:{unquote(PROXY_PASSWORD)}".encode()).decode() \
            not in quoted
        for secret in (TENANT_TOKEN, WRITE_KEY):
            # Config load strips the file-mounted newline before the token is used.
            secret = secret.strip()
            assert base64.b64encode(f"{secret}:".encode() if ":" not in secret
                                    else secret.encode()).decode() in quoted
        assert f"Bearer {API_TOKEN.strip()}" in quoted and QUERY_KEY in quoted
        joined = "\n".join(outputs)
        assert "HTTP 400" in joined and "HTTP 500" in joined
        _assert_clean("the CLI", outputs)

        daemon = DaemonProcess(config, tmp_path / "daemon.log", "--health-port", "0")
        try:
            port = daemon.health_port()
            seen = echo.requests
            wait_until(lambda: echo.requests > seen + 4, "the daemon to send", timeout=60)
            wait_until(lambda: any("HTTP" in r.get("message", "") for r in daemon.records()),
                       "the daemon to log a destination's error", timeout=60)
            metrics = http_get(f"http://127.0.0.1:{port}/metrics")[1]
            health = http_get(f"http://127.0.0.1:{port}/healthz")[1]
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
        finally:
            stop_all([daemon])
        _assert_clean("the daemon's log", [daemon.log_path.read_text(errors="replace")])
        _assert_clean("/metrics and /healthz", [metrics, health])
    state = _dump_state(state_url)
    assert "HTTP 400" in state  # the stored errors are there, redacted
    _assert_clean("the state store", [state])
