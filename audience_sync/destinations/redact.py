"""Keeping secrets out of what we show: every form a secret takes in a message, and URLs.

A secret reaches a message in more shapes than its own: httpx quotes a bad header value as
bytes (`b'Bearer tok\\n'`), a server echoes `Authorization: Basic base64(tok:)`, a URL carries
it percent-encoded, JSON escapes it. The Redactor removes all of them; callers redact the
whole text first and only then shorten it, so no prefix of a secret survives a cut.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

from audience_sync.urls import MASK, mask_url, mask_urls_in

__all__ = ["MASK", "Redactor", "mask_url", "secret_forms", "url_secrets"]
# Shortest userinfo part or query value treated as a secret (see url_secrets).
_MIN_URL_SECRET = 4



def _b64_forms(raw: bytes) -> set[str]:
    standard = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    return {standard, standard.rstrip("="), urlsafe, urlsafe.rstrip("=")}


def secret_forms(secret: str) -> set[str]:
    """The shapes `secret` can take in a message: raw and stripped; repr, bytes repr and JSON
    escapes; percent-encoded (quote, quote_plus); base64 of itself and of `secret:` (Basic)."""
    forms: set[str] = set()
    for value in {secret, secret.strip()}:
        if not value:
            continue
        encoded = value.encode("utf-8", errors="surrogatepass")
        forms |= {
            value,
            repr(value)[1:-1],
            repr(encoded)[2:-1],
            json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1],
            quote(value, safe=""),
            quote(value),
            quote_plus(value),
        }
        forms |= _b64_forms(encoded) | _b64_forms(encoded + b":")
    return {form for form in forms if form}


def url_secrets(url: str) -> list[str]:
    """The secrets a URL carries: its userinfo (user, password, and `user:password` as Basic
    auth sends it) and its query values, each raw and percent-decoded."""
    try:
        parts = urlsplit(url)
        username, password = parts.username, parts.password
    except ValueError:
        return []
    found: list[str] = []
    if username or password:
        user, secret = username or "", password or ""
        found += [user, secret, unquote(user), unquote(secret),
                  f"{unquote(user)}:{unquote(secret)}", f"{user}:{secret}"]
    for _, value in parse_qsl(parts.query, keep_blank_values=False):
        found += [value, quote_plus(value)]
    for piece in parts.query.split("&"):
        found.append(piece.partition("=")[2])
    # A short query value (`?v=1`) is a setting, not a secret: masking every `1` in a message
    # would hide the message. mask_url still masks it wherever the URL itself is shown.
    return [value for value in found if len(value) >= _MIN_URL_SECRET]


class Redactor:
    """Removes every form of the given secrets, and masks URLs, in text before it is shown."""

    def __init__(self, secrets: Iterable[str]) -> None:
        found: set[str] = set()
        for secret in secrets:
            if secret:
                found |= secret_forms(secret)
        # Longest first: a secret's encoding may contain a shorter secret.
        self._pattern = re.compile("|".join(
            re.escape(s) for s in sorted(found, key=len, reverse=True))) if found else None

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return mask_urls_in(text)
