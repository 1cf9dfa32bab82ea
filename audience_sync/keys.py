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


# The identify call already uses these trait names for the contact and its identity (messages.py:
# contact traits; Planhat's `companyId` and `externalId`; Segment's `userId` and `id`). An
# audience named `Email` got the key `email`, and its `true` replaced the contact's address.
# Compared without underscores and case, so `company_id`, `companyid` and `companyId` all match
# (the first spelling listed is the one a message names).
RESERVED_FIELDS = ("email", "name", "title", "company_id", "companyId", "user_id", "userId",
                   "externalId", "id")
_RESERVED = {field.replace("_", "").lower(): field for field in reversed(RESERVED_FIELDS)}


def reserved_key_reason(key: str) -> str | None:
    """Why `key` cannot name an audience or trait, or None when it can."""
    field = _RESERVED.get(key.replace("_", "").lower())
    if field is None:
        return None
    return (f"key {key!r} collides with the contact field {field!r} that every identify "
            "carries; choose another name or an explicit key")
