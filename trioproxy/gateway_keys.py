"""Gateway API keys: the bearer tokens clients send to trioproxy.

Format (GitHub's token design): ``tpk_`` + 32 random base62 characters + a 6-character base62 CRC32 of
everything before it. The prefix makes a leaked key recognisable to secret scanners and people; base62 keeps
it one word for double-click selection; the checksum lets the proxy reject typos and garbage before any
lookup. 32 base62 characters carry 190 bits of entropy, so the stored form is a plain SHA-256 (no slow KDF
needed for random keys) under a unique index; the full key is shown once, at creation.

Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib

PREFIX = "tpk_"
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
BODY_CHARS = 32
CHECKSUM_CHARS = 6  # 62**6 > 2**32, so every CRC32 fits
KEY_LENGTH = len(PREFIX) + BODY_CHARS + CHECKSUM_CHARS
DISPLAY_CHARS = 12  # "tpk_" + 8 random characters: enough to tell keys apart, useless for guessing
_BASE62_SET = frozenset(BASE62)


def _base62(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        digits.append(BASE62[rem])
    return "".join(reversed(digits))


def checksum(head: str) -> str:
    """The 6-character base62 CRC32 that ends a key whose other characters are ``head``."""
    return _base62(zlib.crc32(head.encode("ascii")), CHECKSUM_CHARS)


def generate_gateway_key() -> str:
    """A new random gateway key, e.g. ``tpk_3fZ…`` (42 characters)."""
    body = "".join(secrets.choice(BASE62) for _ in range(BODY_CHARS))
    head = PREFIX + body
    return head + checksum(head)


def has_valid_checksum(key: str) -> bool:
    """Whether ``key`` is shaped like a gateway key and its checksum matches (no lookup, constant cost)."""
    if len(key) != KEY_LENGTH or not key.startswith(PREFIX):
        return False
    if not _BASE62_SET.issuperset(key[len(PREFIX) :]):
        return False
    head, tail = key[:-CHECKSUM_CHARS], key[-CHECKSUM_CHARS:]
    return secrets.compare_digest(checksum(head), tail)


def hash_gateway_key(key: str) -> str:
    """The stored and looked-up form of a key: SHA-256, lower-case hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    """The part of a key that may be shown and logged, e.g. ``tpk_3fZq8KcA…``."""
    return key[:DISPLAY_CHARS] + "…"
