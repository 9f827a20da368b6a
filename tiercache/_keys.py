"""Key rules: what a valid cache key is, namespacing, and hashing of keys too long for a tier."""

from __future__ import annotations

import hashlib

from ._errors import InvalidKeyError

__all__ = ["MAX_KEY_LENGTH", "check_key", "hashed_key", "full_key"]

MAX_KEY_LENGTH = 8192  # characters; longer keys are almost certainly a bug (a whole payload as key)


def check_key(key: object) -> str:
    """Return ``key`` if it is a usable key, else raise InvalidKeyError (also a ValueError).

    Decided rules: a key is a non-empty ``str`` of at most MAX_KEY_LENGTH characters. Any
    characters are allowed (control characters and non-ASCII included): tiers that cannot store
    them as they are percent-encode or hash them, and keys too long for a tier are hashed there.
    """
    if type(key) is not str:
        if not isinstance(key, str):
            raise InvalidKeyError(f"cache keys are str, not {type(key).__qualname__}")
        key = str.__str__(key)  # a str subclass: its plain value, then the same checks
    if not key:
        raise InvalidKeyError("cache key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"cache key is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}")
    return key


def full_key(namespace: str, key: str) -> str:
    return f"{namespace}:{key}"


def hashed_key(key: str, limit_bytes: int) -> str:
    """``key`` if its UTF-8 form fits in ``limit_bytes``, else a stable shortened form.

    The shortened form keeps a readable prefix and ends in a SHA-256 of the whole key; the entry
    stores the original key, so a reader can still detect the (astronomically unlikely) collision.
    """
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) <= limit_bytes:
        return key
    digest = hashlib.sha256(raw).hexdigest()
    keep = max(0, limit_bytes - len(digest) - 3)
    prefix = raw[:keep].decode("utf-8", "ignore")
    return f"{prefix}#h:{digest}"
