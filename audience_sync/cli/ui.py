"""`ui`: the read-only dashboard."""

from __future__ import annotations

import logging

import typer

from audience_sync.cli.common import app, open_config, open_store
from audience_sync.errors import UsageError

log = logging.getLogger("audience_sync.ui")


def resolve_token(option: str | None, configured: str | None) -> str | None:
    """--ui-token (or AUDIENCE_SYNC_UI_TOKEN) over ui_token in the config; cleaned like every
    other secret, and never echoed."""
    if option is None:
        return configured
    from audience_sync.config import clean_secret

    try:
        cleaned = clean_secret(option)
    except ValueError as exc:
        raise UsageError(f"--ui-token {exc}") from None
    assert isinstance(cleaned, str)
    return cleaned


@app.command()
def ui(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; any address but "
                             "a loopback one needs a token."),
    port: int = typer.Option(8477, "--port", min=0, max=65535, help="Port (0: any free one)."),
    ui_token: str = typer.Option(None, "--ui-token", envvar="AUDIENCE_SYNC_UI_TOKEN",
                                 show_default=False, show_envvar=True,
                                 help="Token the dashboard asks for (default: ui_token in the "
                                 "config)."),
) -> None:
    """Serve the read-only dashboard: audiences, runs, deliveries, one user's timeline."""
    from audience_sync.ui.auth import check_bind

    config = open_config(ctx)
    token = resolve_token(ui_token, config.ui_token)
    check_bind(host, token)
    # Here, not at the top: `--help` and the other commands need no template engine.
    from audience_sync.ui.app import Dashboard
    from audience_sync.ui.server import UIServer

    store = open_store(config)
    try:
        server = UIServer(Dashboard(store, config, token), host, port)
    except OSError as exc:
        store.dispose()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    print(f"audience-sync dashboard on http://{host}:{server.port}/"
          + (" (token required)" if token else "") + " - Ctrl+C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server.server_close()
        store.dispose()
