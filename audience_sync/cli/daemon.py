"""`run`: the daemon."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

import typer

from audience_sync.cli.common import app, globals_of, open_config, open_store
from audience_sync.cli.ui import resolve_token
from audience_sync.errors import UsageError
from audience_sync.logs import setup_logging

if TYPE_CHECKING:
    from audience_sync.config import Config
    from audience_sync.state.store import Store
    from audience_sync.ui.app import Dashboard

# leases.DEFAULT_TTL, spelled out so `--help` need not import the state store
# (test_cli_lease_ttl_default_is_the_leases_default).
DEFAULT_LEASE_TTL = "60s"


@app.command()
def run(
    ctx: typer.Context,
    health_port: int = typer.Option(None, "--health-port", min=0, max=65535,
                                    help="Serve /healthz and /metrics on this port "
                                    "(0: any free port, logged)."),
    health_host: str = typer.Option("0.0.0.0", "--health-host",
                                    help="Address the health server binds."),
    owner: str = typer.Option(None, "--owner", help="Lease owner name; unique per process "
                              "(default host:pid:random)."),
    lease_ttl: str = typer.Option(DEFAULT_LEASE_TTL, "--lease-ttl",
                                  help="How long a lease lasts unless renewed."),
    ui_token: str = typer.Option(None, "--ui-token", envvar="AUDIENCE_SYNC_UI_TOKEN",
                                 show_default=False, show_envvar=True,
                                 help="Token for the dashboard on the health port (default: "
                                 "ui_token in the config)."),
) -> None:
    """The daemon: run each audience on its cadence and deliver its changes, until stopped."""
    from audience_sync.health import HealthServer, Metrics
    from audience_sync.leases import default_owner
    from audience_sync.scheduler import Daemon, DaemonOptions

    ttl = _duration(lease_ttl, "--lease-ttl")
    options = globals_of(ctx)
    setup_logging(options.log_format, options.verbose, daemon=True)
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
    from audience_sync.ui.auth import is_loopback

    if token is None and not is_loopback(host):
        logging.getLogger("audience_sync.health").warning(
            "health: the dashboard is off on %s: a non-loopback address needs ui_token in the "
            "config (or --ui-token)", host)
        return None
    from audience_sync.ui.app import Dashboard  # the template engine only when it serves

    return Dashboard(store, config, token)


def _duration(value: str, option: str) -> timedelta:
    from audience_sync.config import parse_duration

    try:
        ttl = parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
    if ttl.total_seconds() <= 0:
        raise UsageError(f"{option}: must be longer than 0s")
    return ttl
