"""What every command shares: the app, global options, opening config and store, output."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from audience_sync import __version__
from audience_sync.clock import iso, utcnow
from audience_sync.errors import ConfigError, UsageError
from audience_sync.logs import LOG_FORMATS, same_stream, setup_logging

# Commands import what they use: `--help` and `--version` must not load SQLAlchemy, alembic,
# httpx or psycopg (test_help_and_version_import_no_database_or_http_library).
if TYPE_CHECKING:
    from audience_sync.config import Computation, Config
    from audience_sync.drain import DrainReport
    from audience_sync.state.store import Store

__all__ = ["iso"]  # re-exported for the command modules

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document.")
# The version of the --json documents' shapes (README, "JSON output"): bumped when a field
# changes meaning or goes away; new fields do not bump it.
SCHEMA_VERSION = 1

app = typer.Typer(
    name="audience-sync",
    help="Engage-style audience sync: compute audiences from your SQL database, "
    "keep their history, send the changes to Planhat and Segment-spec destinations.",
    no_args_is_help=True,
    # `audience-sync --install-completion` / `--show-completion` (bash, zsh, fish, PowerShell).
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class Globals:
    config_path: Path | None
    verbose: bool
    log_format: str = "plain"


def _print_version(value: bool) -> None:
    if value:
        print(f"audience-sync {__version__}")
        raise typer.Exit(0)


@app.callback()
def _callback(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", "-c", envvar="AUDIENCE_SYNC_CONFIG",
        help="Path to config.yaml (default ./config.yaml, or $AUDIENCE_SYNC_CONFIG)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Tracebacks and debug logs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors in the logs."),
    log_format: str = typer.Option(
        "plain", "--log-format", help="Log lines: plain or json (also after the command)."),
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print the version and exit."),
) -> None:
    if log_format not in LOG_FORMATS:
        raise UsageError(f"--log-format: {log_format!r} is not plain or json")
    ctx.obj = Globals(config_path=config, verbose=verbose, log_format=log_format)
    # One stream for both (2>&1, a terminal): the summaries are printed, not logged too.
    setup_logging(log_format, verbose, quiet=quiet, drop_summaries=same_stream())


def globals_of(ctx: typer.Context) -> Globals:
    root = ctx.find_root()
    obj = root.obj
    assert isinstance(obj, Globals)
    return obj


def open_config(ctx: typer.Context) -> Config:
    from audience_sync.config import load_config

    return load_config(globals_of(ctx).config_path)


def open_store(config: Config, *, register: bool = True) -> Store:
    """Open the state database, upgrade its schema and register configured audiences."""
    from audience_sync.state.store import Store

    store = Store(config.state_db)
    store.upgrade()
    if register:
        store.register(config.computations, utcnow())
    return store


def parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{option}: {value!r} is not an ISO-8601 time "
                         "such as 2026-11-28T10:00:00Z") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        # 9999-12-31T23:59:59-05:00 is a valid ISO time whose UTC is past year 9999.
        raise UsageError(f"{option}: {value!r} is outside the years 1 to 9999 in UTC") from None


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def console() -> Console:
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def print_drain_report(report: DrainReport) -> None:
    """One line per destination: sent, failed, to retry, and why it stopped if it did."""
    for name, dest in report.destinations.items():
        line = f"  -> {name}: {dest.sent} sent, {dest.failed} failed"
        if dest.deferred:
            line += f", {dest.deferred} to retry"
        if dest.error:
            line += f" ({dest.error})"
        print(line)


def unknown_name(name: str, config: Config) -> str:
    """`unknown audience 'hgh_scorers' (did you mean 'high_scorers'?; known: ...)`."""
    import difflib

    names = [c.key for c in config.computations] + [c.name for c in config.computations]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?; " if close else ""
    known = ", ".join(c.key for c in config.computations)
    return f"unknown audience {name!r} ({hint}known: {known})"


def resolve(config: Config, names: list[str]) -> list[Computation]:
    """Audiences and traits by name or key (all of them for no names); unknown is usage."""
    if not names:
        return list(config.computations)
    found: list[Computation] = []
    for name in names:
        try:
            comp = config.find(name)
        except ConfigError as exc:
            if exc.field.endswith(".enabled"):  # a disabled one: say so, not "unknown"
                raise UsageError(exc.problem) from None
            raise UsageError(unknown_name(name, config)) from None
        if comp not in found:
            found.append(comp)
    return found
