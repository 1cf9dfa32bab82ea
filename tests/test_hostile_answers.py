"""Answers a destination should not send, and what the outbox makes of them.

A Retry-After of centuries, infinity or NaN must not park deliveries forever or crash the
outcome writer; a Planhat 206 that names no item of the request must not acknowledge it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from audience_sync.state import schema as t
from audience_sync.state.store import Store
from tests.delivery_setup import API_TOKEN, TENANT_TOKEN, delivery_config, set_env
from tests.fakes import Answer, FakePlanhat
from tests.helpers import cli


@pytest.fixture
def planhat() -> Iterator[FakePlanhat]:
    fake = FakePlanhat(TENANT_TOKEN, API_TOKEN)
    with fake.running():
        yield fake


def _deliveries(state_url: str) -> list[tuple[str, str, datetime | None, str | None]]:
    d = t.deliveries
    store = Store(state_url)
    try:
        with store.read() as conn:
            return [(row.user_id, row.status, row.next_attempt_at, row.last_error)
                    for row in conn.execute(select(d.c.user_id, d.c.status,
                                                   d.c.next_attempt_at, d.c.last_error))]
    finally:
        store.dispose()


@pytest.mark.parametrize("header", ["Fri, 31 Dec 9999 23:59:59 GMT", "1e10", "inf", "nan",
                                    "-5"])
def test_retry_after_far_future_or_non_finite_is_treated_as_absent(
        tmp_path: Path, state_url: str, planhat: FakePlanhat, header: str,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = delivery_config(tmp_path, state_url, planhat=planhat.url, trait=False)
    planhat.fail_next(2, "429", retry_after=header)
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 0, err
    assert "OverflowError" not in out + err
    # Retried within the drain under the usual backoff: everything went out now.
    assert {status for _, status, _, _ in _deliveries(state_url)} == {"sent"}
    assert len(planhat.messages) == 3


def test_retry_after_far_future_is_capped(
        tmp_path: Path, state_url: str, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A sane but long Retry-After (6 days) defers the deliveries for at most max_defer."""
    set_env(monkeypatch)
    config = delivery_config(tmp_path, state_url, planhat=planhat.url, trait=False,
                             overrides={"planhat": {"max_defer": "20m"}})
    planhat.fail_next(100, "429", retry_after=str(6 * 86400))
    before = datetime.now(UTC)
    cli(capsys, "--config", str(config), "sync", "--json")
    rows = _deliveries(state_url)
    assert rows and {status for _, status, _, _ in rows} == {"pending"}
    for _, _, next_at, _ in rows:
        assert next_at is not None
        assert next_at.replace(tzinfo=next_at.tzinfo or UTC) <= \
            datetime.now(UTC) + timedelta(minutes=20)
        assert next_at.replace(tzinfo=next_at.tzinfo or UTC) >= \
            before + timedelta(minutes=19)


@pytest.mark.parametrize("answer", [
    Answer(206, raw=b"<html><body>Partial Content</body></html>"),
    Answer(206, {}),
    Answer(206, {"createdErrors": [], "updatedErrors": [], "permissionErrors": []}),
    Answer(206, {"createdErrors": [{"externalId": "not-in-the-request", "error": "bad"}]}),
], ids=["html", "empty-object", "empty-lists", "unknown-external-id"])
def test_planhat_206_naming_no_item_acknowledges_nothing(
        tmp_path: Path, state_url: str, planhat: FakePlanhat, answer: Answer,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = delivery_config(tmp_path, state_url, planhat_api=planhat.url, trait=False)
    planhat.bulk_answers.append(answer)
    cli(capsys, "--config", str(config), "sync", "--json")
    rows = _deliveries(state_url)
    assert len(rows) == 3
    assert {status for _, status, _, _ in rows} == {"pending"}
    assert all(error is not None and "did not attribute" in error for *_, error in rows)
    # The next drain sends them again and this time Planhat takes them.
    code, _, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 0, err
    assert {status for _, status, _, _ in _deliveries(state_url)} == {"sent"}
    assert set(planhat.endusers) == {"u1", "u2", "u3"}


def test_planhat_206_fails_only_the_items_it_names(
        tmp_path: Path, state_url: str, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """One item named, one error naming nothing known: the named one fails, the rest wait."""
    set_env(monkeypatch)
    config = delivery_config(tmp_path, state_url, planhat_api=planhat.url, trait=False)
    planhat.bulk_answers.append(Answer(206, {"createdErrors": [
        {"externalId": "u2", "error": "no company"}, {"error": "something else failed"}]}))
    cli(capsys, "--config", str(config), "sync", "--json")
    by_user = {user: (status, error) for user, status, _, error in _deliveries(state_url)}
    assert by_user["u2"] == ("failed", "HTTP 206: no company")
    assert by_user["u1"][0] == by_user["u3"][0] == "pending"
