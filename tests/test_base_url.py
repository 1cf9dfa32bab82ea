"""A destination's base_url as users write it: a proxy's key in its query, credentials in its
userinfo. The query goes on every request (httpx appended the path to it), and userinfo never
replaces a destination's own Authorization header (httpx sent Basic from it in place of
Planhat's Bearer token)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.delivery_setup import API_TOKEN, TENANT_TOKEN, WRITE_KEY, delivery_config, set_env
from tests.fakes import FakePlanhat, FakeSegment
from tests.helpers import cli


def test_base_url_query_and_userinfo_reach_the_destination_as_meant(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    with FakePlanhat(TENANT_TOKEN, API_TOKEN).running() as planhat, \
            FakeSegment(WRITE_KEY).running() as segment:
        assert isinstance(planhat, FakePlanhat) and isinstance(segment, FakeSegment)
        proxied = planhat.url.replace("http://", "http://proxy:pa%40ss@") + "/?key=k1&v=2"
        config = delivery_config(tmp_path, state_url, planhat_api=proxied,
                                 segment=segment.url + "?key=k2", trait=False)
        code, out, err = cli(capsys, "--config", str(config), "sync")
        assert code == 0, out + err
        assert len(planhat.endusers) == 3 and len(segment.messages) == 3
        assert planhat.raw_paths and all(
            path.split("?")[1].split("&")[:2] == ["key=k1", "v=2"]
            for path in planhat.raw_paths)
        assert {p.split("?")[0] for p in planhat.raw_paths} == {"/customfields", "/endusers"}
        assert set(planhat.auth_headers) == {f"Bearer {API_TOKEN}"}
        assert segment.raw_paths == ["/v1/batch?key=k2"]
        code, out, err = cli(capsys, "--config", str(config), "check")
        assert code == 0, out + err
        assert "planhat_api: ok (API token accepted by http://***@127.0.0.1:" in out
        assert "?key=***&v=***)" in out and "pa%40ss" not in out + err
