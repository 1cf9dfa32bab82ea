"""`run`: the daemon."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import typer

from audience_sync.cli.common import StderrHandler, app, globals_of, open_config, open_store
from audience_sync.cli.ui import resolve_token
from audience_sync.config import Config, parse_duration
from audience_sync.errors import UsageError
from audience_sync.health import HealthServer, Metrics
from audience_sync.leases import DEFAULT_TTL, default_owner
from audience_sync.scheduler import Daemon, DaemonOptions
from audience_sync.store import Store
from audience_sync.ui.auth import is_loopback

if TYPE_CHECKING:
    from audience_sync.ui.app import Dashboard


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the structured fields a log line carries."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update({k: v for k, v in fields.items() if k not in document})
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="seconds") \
            .replace("+00:00", "Z")


def configure_logging(fmt: str, verbose: bool) -> None:
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The package logger may have been given a handler of its own (the CLI's plain lines).
    package = logging.getLogger("audience_sync")
    package.handlers[:] = []
    package.setLevel(level)
    package.propagate = True
    # APScheduler says "skipped: maximum number of running instances reached" whenever a tick
    # outlasts the interval; that is the coalescing we asked for, not news.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def run(
    ctx: typer.Context,
    log_format: str = typer.Option("plain", "--log-format", help="plain or json."),
    health_port: int = typer.Option(None, "--health-port", min=0, max=65535,
                                    help="Serve /healthz and /metrics on this port "
                                    "(0: any free port, logged)."),
    health_host: str = typer.Option("0.0.0.0", "--health-host",
                                    help="Address the health server binds."),
    owner: str = typer.Option(None, "--owner", help="Lease owner name; unique per process "
                              "(default host:pid:random)."),
    lease_ttl: str = typer.Option(f"{int(DEFAULT_TTL.total_seconds())}s", "--lease-ttl",
                                  help="How long a lease lasts unless renewed."),
    ui_token: str = typer.Option(None, "--ui-token", envvar="AUDIENCE_SYNC_UI_TOKEN",
                                 show_default=False, show_envvar=True,
                                 help="Token for the dashboard on the health port (default: "
                                 "ui_token in the config)."),
) -> None:
    """The daemon: run each audience on its cadence and deliver its changes, until stopped."""
    if log_format not in ("plain", "json"):
        raise UsageError(f"--log-format: {log_format!r} is not plain or json")
    ttl = _duration(lease_ttl, "--lease-ttl")
    configure_logging(log_format, globals_of(ctx).verbose)
    config = open_config(ctx)
    store = open_store(config)
    metrics = Metrics(store, config)
    server: HealthServer | None = None
    if health_port is not None:
        ui = _dashboard(store, config, health_host, resolve_token(ui_token, config.ui_token))
        server = HealthServer(metrics, health_host, health_port, ui=ui).start()
        logging.getLogger("audience_sync.health").info(
            "health: serving /healthz and /metrics%s on %s:%d",
            " and the dashboard" if ui else "", health_host, server.port,
            extra={"fields": {"health_port": server.port}})
    daemon = Daemon(store, config, DaemonOptions(owner=owner or default_owner(), lease_ttl=ttl),
                    observer=metrics)
    try:
        code = daemon.serve()
    finally:
        if server is not None:
            server.stop()
        store.dispose()
    raise typer.Exit(code)


def _dashboard(store: Store, config: Config, host: str, token: str | None) -> Dashboard | None:
    """The dashboard beside the probes: with a token, or without one on a loopback address.
    A probe port bound to every address without a token keeps serving probes and scrapes
    (refusing to start would take the daemon down), and shows no page."""
    if token is None and not is_loopback(host):
        logging.getLogger("audience_sync.health").warning(
            "health: the dashboard is off on %s: a non-loopback address needs ui_token in the "
            "config (or --ui-token)", host)
        return None
    from audience_sync.ui.app import Dashboard  # the template engine only when it serves

    return Dashboard(store, config, token)


def _duration(value: str, option: str) -> timedelta:
    try:
        ttl = parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
    if ttl.total_seconds() <= 0:
        raise UsageError(f"{option}: must be longer than 0s")
    return ttl
