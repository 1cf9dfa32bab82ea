"""Run the real daemon as a subprocess, and wait on observable state with bounded polls."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select

from audience_sync.state import queries
from audience_sync.state import schema as t
from audience_sync.state.store import Store

AUDIENCE_SYNC = str(Path(sys.executable).with_name("audience-sync"))
POLL_SECONDS = 0.05

T = TypeVar("T")


def wait_until(check: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    pause = threading.Event()
    for _ in range(int(timeout / POLL_SECONDS)):
        value = check()
        if value:
            return value
        pause.wait(POLL_SECONDS)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class DaemonProcess:
    """`audience-sync run --log-format json` with its stderr in a file."""

    def __init__(self, config: Path, log: Path, *args: str) -> None:
        self.log_path = log
        self._log = log.open("ab")
        env = {k: v for k, v in os.environ.items() if k != "AUDIENCE_SYNC_CONFIG"}
        self.proc = subprocess.Popen(
            [AUDIENCE_SYNC, "--config", str(config), "run", "--log-format", "json", *args],
            stdout=subprocess.DEVNULL, stderr=self._log, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def health_port(self) -> int:
        def port() -> int | None:
            for record in self.records():
                if "health_port" in record:
                    return int(record["health_port"])
            return None

        return wait_until(port, "the health server to start")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 60) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._log.close()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def delivery_statuses(store: Store) -> dict[str, int]:
    d = t.deliveries
    with store.read() as conn:
        rows = conn.execute(select(d.c.status)).scalars().all()
    counts: dict[str, int] = {}
    for status in rows:
        counts[status] = counts.get(status, 0) + 1
    return counts


def runs(store: Store) -> list[dict[str, Any]]:
    """Every run record, oldest first."""
    return [dataclasses.asdict(record) for record in reversed(queries.runs(store, limit=None))]


def latest_values(messages: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """userId -> the last value of `key` the destination acknowledged."""
    state: dict[str, Any] = {}
    for message in messages:
        traits = message.get("traits", {})
        if key in traits:
            state[message["userId"]] = traits[key]
    return state


def stop_all(daemons: list[DaemonProcess]) -> None:
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.signal(signal.SIGKILL)
            daemon.proc.wait(30)
