"""URLs shown to people: userinfo and query values masked, since either may carry a secret."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

MASK = "***"

# scheme://[user[:password]@]rest. A username without `/`, `:` or `@`; a password up to the
# first `@` (SQLAlchemy's own rule, which lets a database password contain `/`).
_USERINFO = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)"
    r"(?P<user>[^:/@?#\s]*)(?::(?P<password>[^@]*))?@")
# A URL inside a message: up to whitespace, a quote or an angle bracket, and not ending in
# the punctuation of the sentence around it ("cannot reach http://h/: refused").
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*[^\s'\"<>:;,.)\]]")


def mask_url(url: str) -> str:
    """`http://***@host/path?key=***`: the whole userinfo, every query value, any fragment.

    The userinfo goes whole: a username alone is how Basic-auth keys travel in URLs
    (`https://WRITE_KEY@api.segment.io`), and a password needs no partial showing.
    Works on any text (never raises): what it cannot parse it masks rather than prints.
    """
    head, hash_mark, fragment = url.partition("#")
    head, question, query = head.partition("?")
    match = _USERINFO.match(head)
    if match:
        head = f"{match.group('scheme')}{MASK}@{head[match.end():]}"
    if question:
        head += "?" + "&".join(_mask_parameter(p) for p in query.split("&"))
    if hash_mark:
        head += "#" + (MASK if fragment else "")
    return head


def _mask_parameter(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    if not equals:
        # `?token` alone may be the secret itself; `?` followed by nothing stays as it is.
        return MASK if name else name
    return f"{name}={MASK}" if value else f"{name}="


def mask_urls_in(text: str) -> str:
    """`text` with every URL in it passed through mask_url (messages that quote a URL)."""
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def with_psycopg(url: URL) -> URL:
    """`postgresql://` means psycopg 3 here, for the state store and sources alike
    (SQLAlchemy's default driver for that scheme is psycopg2, which is not installed)."""
    return url.set(drivername="postgresql+psycopg") if url.drivername == "postgresql" else url
