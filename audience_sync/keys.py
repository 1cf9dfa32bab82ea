"""Audience and trait keys: the stable snake_case identifier sent as a trait name."""

from __future__ import annotations

import re
import unicodedata

import inflection

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_KEY_LENGTH = 100

# Letters that NFKD does not decompose into ASCII.
_SPECIAL = str.maketrans(
    {"ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "Ae", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "Oe",
     "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D"}
)
_NON_WORD = re.compile(r"[^A-Za-z0-9]+")


def derive_key(name: str, prefix: str = "audience") -> str:
    """Snake-case a display name: transliterate, split camelCase, punctuation breaks words.

    Raises ValueError when nothing usable is left.
    """
    ascii_name = inflection.transliterate(name.translate(_SPECIAL))
    ascii_name = unicodedata.normalize("NFKD", ascii_name).encode("ascii", "ignore").decode()
    words = _NON_WORD.sub(" ", ascii_name).split()
    key = "_".join(inflection.underscore(word) for word in words)
    key = re.sub(r"_+", "_", key).strip("_")
    if not key:
        raise ValueError(f"name {name!r} has no letters or digits to make a key from")
    if key[0].isdigit():
        # A trait name must not start with a digit in most destinations.
        key = f"{prefix}_{key}"
    return key


def check_key(key: str) -> str:
    """Validate an explicit key; return it unchanged."""
    if not KEY_PATTERN.match(key):
        raise ValueError(f"key {key!r} must match [a-z][a-z0-9_]*")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"key is longer than {MAX_KEY_LENGTH} characters")
    return key
