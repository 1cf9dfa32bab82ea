"""The one logging setup, for every command and the daemon: plain lines or JSON, on stderr.

One timestamp format everywhere: ISO-8601 in UTC with a Z and milliseconds
(2026-11-30T15:02:51.123Z).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("plain", "json")

# Chatty libraries: what they say below these levels is not news to an operator. APScheduler
# says "skipped: maximum number of running instances reached" whenever a tick outlasts the
# interval; that is the coalescing we asked for.
_QUIET = {"apscheduler": logging.ERROR, "httpx": logging.WARNING,
          "httpcore": logging.WARNING, "alembic": logging.WARNING}


def timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the structured fields a log line carries."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": timestamp(record),
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


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record is emitted, not when it was set up
    (a process that swaps its stderr, as pytest does, must not log to a closed stream)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        return None


def same_stream() -> bool:
    """stdout and stderr are one file, pipe or terminal (`2>&1`, or both on a terminal)."""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


class DropSummaries(logging.Filter):
    """Drops the log lines a command prints as its summary anyway (records logged with
    extra={"summary": True}): one stream must not carry every outcome twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "summary", False)


def setup_logging(fmt: str = "plain", verbose: bool = False, *, daemon: bool = False,
                  quiet: bool = False, drop_summaries: bool = False) -> None:
    """Log lines on stderr in `fmt` (plain or json). Commands log at INFO when stderr is not a
    terminal (a progress bar shows otherwise), WARNING on one; the daemon always at INFO;
    -v is DEBUG, -q ERROR. `drop_summaries`: the command prints its summary on the same
    stream, so the log lines that say the same are left out."""
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.ERROR
    elif daemon or not sys.stderr.isatty():
        level = logging.INFO
    else:
        level = logging.WARNING
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    if drop_summaries:
        handler.addFilter(DropSummaries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    package = logging.getLogger("audience_sync")
    package.handlers[:] = []
    package.setLevel(level)
    package.propagate = True
    for name, floor in _QUIET.items():
        logging.getLogger(name).setLevel(floor)
