"""The dashboard as a WSGI app: routes, the token check, Jinja2 pages and /api JSON.

Read-only: every request reads the state store through state.dashboard in one transaction.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, quote
from wsgiref.types import StartResponse, WSGIEnvironment

from jinja2 import Environment, PackageLoader

from audience_sync.clock import Clock, iso, utcnow
from audience_sync.config import Config
from audience_sync.errors import StoreError
from audience_sync.state import dashboard
from audience_sync.state.store import Store
from audience_sync.states import RunStatus
from audience_sync.ui import auth, charts, shapes

log = logging.getLogger("audience_sync.ui")

# Nothing is fetched from anywhere: styles are inline, charts are inline SVG, no script runs.
SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
     "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]
MAX_FORM_BYTES = 4096

_AUDIENCE = re.compile(r"^/audiences/([^/]+)$")
_USER = re.compile(r"^/audiences/([^/]+)/users/(.+)$")
_LOOKUP = re.compile(r"^/audiences/([^/]+)/users/?$")


@dataclass
class Response:
    status: str
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


def _wsgi_text(value: str) -> str:
    """WSGI hands PATH_INFO over as latin-1 characters of the raw bytes; user ids are UTF-8."""
    try:
        return value.encode("iso-8859-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


class Dashboard:
    """The WSGI application. `token` None: open (the caller checked the bind address)."""

    def __init__(self, store: Store, config: Config, token: str | None, *,
                 clock: Clock = utcnow) -> None:
        self.store = store
        self.token = token
        self.clock = clock
        # A disabled audience is configured too: kept, not orphaned.
        self.configured = {c.key: c.destinations
                           for c in (*config.computations, *config.disabled)}
        self.disabled = frozenset(c.key for c in config.disabled)
        self.templates = Environment(loader=PackageLoader("audience_sync.ui", "templates"),
                                     autoescape=True, trim_blocks=True, lstrip_blocks=True)
        self.templates.filters.update(ago=_ago, until=_until, iso=iso, num=_num,
                                      seconds=_seconds, quote=lambda v: quote(str(v), safe=""))
        self.templates.globals.update(charts=charts)

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        try:
            response = self.respond(environ)
        except StoreError as exc:
            log.warning("ui: %s", exc.message)
            message = f"The state database did not answer: {exc.message}"
            if str(environ.get("PATH_INFO", "")).startswith("/api/"):
                response = _json({"error": message}, "503 Service Unavailable")
            else:
                response = self._page("error.html", "503 Service Unavailable",
                                      heading="State database unavailable", message=message)
        headers = [("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body))), *SECURITY_HEADERS,
                   *response.headers]
        start_response(response.status, headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [response.body]

    # -- routing -------------------------------------------------------------------------------

    def respond(self, environ: WSGIEnvironment) -> Response:
        method = str(environ.get("REQUEST_METHOD", "GET"))
        path = _wsgi_text(str(environ.get("PATH_INFO", "/"))) or "/"
        query = parse_qs(str(environ.get("QUERY_STRING", "")))
        if path == "/login":
            return self._login(environ, method, query)
        if path == "/logout" and method == "POST":
            return Response("303 See Other", b"", headers=[("Location", "/login"),
                                                           ("Set-Cookie", auth.logout_cookie())])
        if not auth.authorized(environ, self.token):
            return self._unauthorized(path)
        if method not in ("GET", "HEAD"):
            return Response("405 Method Not Allowed", b"method not allowed\n", "text/plain",
                            [("Allow", "GET, HEAD")])
        api = path.startswith("/api/")
        route = path[4:] if api else path
        handlers: list[tuple[re.Pattern[str], Callable[..., Response]]] = [
            (_AUDIENCE, self._audience), (_USER, self._user), (_LOOKUP, self._lookup)]
        if route in ("/", "/status") and (api or route == "/"):
            return self._index(api)
        for pattern, handler in handlers:
            match = pattern.match(route)
            if match:
                return handler(api, query, *match.groups())
        return self._not_found(api, "no such page")

    # -- pages ---------------------------------------------------------------------------------

    def _index(self, api: bool) -> Response:
        now = self.clock()
        with self.store.read() as conn:
            summaries = dashboard.overview(conn, now)
        if api:
            return _json({"schema_version": 1, "state_db": self.store.dialect,
                          "computations": [shapes.status_item(s, self.configured, self.disabled)
                                           for s in summaries]})
        rows = [(s, self._marks(s)) for s in summaries]
        return self._page("index.html", "200 OK", rows=rows, now=now)

    def _audience(self, api: bool, query: dict[str, list[str]], key: str) -> Response:
        now = self.clock()
        older_than = _int(query.get("older_than"))
        with self.store.read() as conn:
            detail = dashboard.audience(conn, key, now, older_than=older_than)
        if detail is None:
            return self._not_found(api, f"no audience or trait with the key {key!r}")
        if api:
            return _json(shapes.audience_document(detail, self.configured))
        succeeded = [r for r in detail.series if r.status == RunStatus.SUCCEEDED]
        line = charts.line_chart([(r.clock, r.members, f"run #{r.id}: {r.members:,} members")
                                  for r in succeeded])
        bars = charts.bar_chart([(r.entered, r.exited, f"run #{r.id}", r.kind == "initial")
                                 for r in succeeded])
        return self._page("audience.html", "200 OK", detail=detail, a=detail.summary,
                          marks=self._marks(detail.summary), line=line, bars=bars, now=now,
                          destinations=self.configured.get(key, ()))

    def _lookup(self, api: bool, query: dict[str, list[str]], key: str) -> Response:
        user_id = (query.get("user_id") or [""])[0].strip()
        if api or not user_id:
            return self._not_found(api, "give a user id")
        return Response("303 See Other", b"", headers=[
            ("Location", f"/audiences/{quote(key, safe='')}/users/{quote(user_id, safe='')}")])

    def _user(self, api: bool, query: dict[str, list[str]], key: str, user_id: str) -> Response:
        now = self.clock()
        with self.store.read() as conn:
            row = dashboard.find(conn, key)
            timeline = dashboard.user_timeline(conn, row.id, user_id) if row else None
        if row is None:
            return self._not_found(api, f"no audience or trait with the key {key!r}")
        if timeline is None:
            return self._not_found(api, f"{key} has never seen the user {user_id!r}")
        if api:
            return _json(shapes.user_document(timeline, key, row.kind))
        return self._page("user.html", "200 OK", key=key, name=row.name, kind=row.kind,
                          timeline=timeline, history=shapes.history_items(timeline, row.kind),
                          now=now)

    # -- auth ----------------------------------------------------------------------------------

    def _login(self, environ: WSGIEnvironment, method: str,
               query: dict[str, list[str]]) -> Response:
        target = _local_path((query.get("next") or ["/"])[0])
        if self.token is None:
            return Response("303 See Other", b"", headers=[("Location", target)])
        if method == "POST":
            form = _read_form(environ)
            target = _local_path((form.get("next") or [target])[0])
            given = (form.get("token") or [""])[0].strip()
            if given and auth.token_matches(given, self.token):
                return Response("303 See Other", b"", headers=[
                    ("Location", target), ("Set-Cookie", auth.session_cookie(self.token))])
            return self._page("login.html", "401 Unauthorized", target=target, wrong=True)
        return self._page("login.html", "200 OK", target=target, wrong=False)

    def _unauthorized(self, path: str) -> Response:
        if path.startswith("/api/"):
            return _json({"error": "unauthorized: send Authorization: Bearer <ui token>"},
                         "401 Unauthorized", [("WWW-Authenticate", "Bearer")])
        response = self._page("login.html", "401 Unauthorized", target=_local_path(path),
                              wrong=False)
        response.headers.append(("WWW-Authenticate", "Bearer"))
        return response

    # -- helpers -------------------------------------------------------------------------------

    def _marks(self, summary: dashboard.AudienceSummary) -> list[str]:
        """What needs an operator's eye: failing runs or deliveries, a held run, an orphan."""
        marks = []
        if summary.key not in self.configured:
            marks.append("orphaned")
        last = summary.last_run
        if last is not None and last.status == RunStatus.HELD:
            marks.append("held")
        if summary.consecutive_failures or (last is not None and last.status == RunStatus.FAILED):
            marks.append("failing")
        if any(summary.failed.values()):
            marks.append("failed deliveries")
        return marks

    def _not_found(self, api: bool, message: str) -> Response:
        if api:
            return _json({"error": message}, "404 Not Found")
        return self._page("error.html", "404 Not Found", heading="Not found", message=message)

    def _page(self, template: str, status: str, **context: Any) -> Response:
        context.setdefault("now", self.clock())
        # A sign-out button wherever a signed-in reader can be (not on the sign-in form).
        context["signed_in"] = self.token is not None and template != "login.html"
        body = self.templates.get_template(template).render(**context).encode()
        return Response(status, body)


def _json(document: Any, status: str = "200 OK",
          headers: list[tuple[str, str]] | None = None) -> Response:
    body = (json.dumps(document, indent=2, default=str) + "\n").encode()
    return Response(status, body, "application/json", headers or [])


def _read_form(environ: WSGIEnvironment) -> dict[str, list[str]]:
    try:
        length = min(int(environ.get("CONTENT_LENGTH") or 0), MAX_FORM_BYTES)
    except ValueError:
        length = 0
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    return parse_qs(body.decode("utf-8", "replace"))


def _local_path(target: str) -> str:
    """Only a path on this server: a login must not redirect to another site."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _int(values: list[str] | None) -> int | None:
    try:
        return int(values[0]) if values else None
    except ValueError:
        return None


def _num(value: int | float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def _seconds(value: float | None) -> str:
    """A duration the way a person says it: 0.4s, 3m 12s, 2h 5m, 1d 3h."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs}s"


def _ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "never"
    delta = (now - value).total_seconds()
    return f"in {_seconds(-delta)}" if delta < 0 else f"{_seconds(delta)} ago"


def _until(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "-"
    delta = (value - now).total_seconds()
    return "now (overdue)" if delta <= 0 else f"in {_seconds(delta)}"
