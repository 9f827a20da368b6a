"""The one exception hierarchy tiercache raises to its callers."""

from __future__ import annotations

__all__ = [
    "CacheClosedError",
    "ConfigurationError",
    "InvalidKeyError",
    "LoaderTimeoutError",
    "SerializationError",
    "TierCacheError",
    "TierError",
    "ValueTooLargeError",
]


class TierCacheError(Exception):
    """Base class of every error tiercache raises on purpose."""


class ConfigurationError(TierCacheError, ValueError):
    """The cache, a tier or a decorator was configured in a way that cannot work."""


class InvalidKeyError(TierCacheError, ValueError):
    """A cache key is not a non-empty ``str`` within the length limit."""


class SerializationError(TierCacheError, TypeError):
    """A value cannot be encoded into (or decoded from) the JSON envelope."""


class ValueTooLargeError(TierCacheError, ValueError):
    """An encoded value is larger than a tier accepts."""


class TierError(TierCacheError):
    """A tier failed (timeout, connection, protocol).

    The core never lets this reach a caller of ``get_cached``/``get``: reads degrade to a miss and
    writes to a counted skip. Tier methods may raise it (or anything else) to report a failure.
    """

    def __init__(self, tier: str, message: str) -> None:
        super().__init__(f"{tier}: {message}")
        self.tier = tier


class CacheClosedError(TierCacheError, RuntimeError):
    """The cache was closed (``aclose()``/``sync.close()``) and then used again."""


class LoaderTimeoutError(TierCacheError, TimeoutError):
    """A loader ran past its hard timeout; it was cancelled when it was a coroutine."""
