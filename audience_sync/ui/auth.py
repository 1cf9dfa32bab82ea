"""Who may see the dashboard: the pages show user ids and emails.

Bound to a loopback address it is open to local users; bound to any other address it needs a
token, given as `Authorization: Bearer TOKEN` or through the login form, which sets a cookie
holding a value derived from the token (never the token itself).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from http.cookies import CookieError, SimpleCookie
from wsgiref.types import WSGIEnvironment

from audience_sync.errors import UsageError

COOKIE = "audience_sync_ui"
_SESSION_CONTEXT = b"audience-sync dashboard session v1"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; any other name or address may be reachable by others."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, option: str = "--host") -> None:
    """:raises UsageError: a non-loopback address without a token."""
    if token is None and not is_loopback(host):
        raise UsageError(f"{option} {host} is not a loopback address: the dashboard shows user "
                         "ids and emails, so set --ui-token (or ui_token in config) to bind it")


def session_value(token: str) -> str:
    """The cookie's value: an HMAC of a fixed text under the token (a stolen cookie does not
    reveal the token, and changing the token ends every session)."""
    return hmac.new(token.encode(), _SESSION_CONTEXT, hashlib.sha256).hexdigest()


def token_matches(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def authorized(environ: WSGIEnvironment, token: str | None) -> bool:
    """True without a token, or with the token as a bearer header or the session cookie."""
    if token is None:
        return True
    header = str(environ.get("HTTP_AUTHORIZATION", ""))
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return token_matches(value.strip(), token)
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(str(environ.get("HTTP_COOKIE", "")))
    except CookieError:
        return False
    morsel = cookies.get(COOKIE)
    return morsel is not None and hmac.compare_digest(morsel.value.encode(),
                                                      session_value(token).encode())


def session_cookie(token: str, max_age: int = 7 * 86400) -> str:
    """The Set-Cookie value after a successful login (no JavaScript can read it; no other
    site's form can send it)."""
    return (f"{COOKIE}={session_value(token)}; Path=/; Max-Age={max_age}; HttpOnly; "
            "SameSite=Strict")


def logout_cookie() -> str:
    return f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
