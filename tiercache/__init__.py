"""multi-tier caching (in-process memory, Redis, Cloudflare KV) with stampede protection.

``import tiercache`` is nearly free (serverless cold starts): the names below are loaded on first
use (PEP 562), and nothing optional is ever imported here -- ``tiercache.adapters.redis`` and
``tiercache.adapters.cloudflare_kv`` load their client libraries only when used.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing would double this module's import time
if TYPE_CHECKING:  # what type checkers and IDEs see; at run time these load lazily
    from typing import Any

    from ._adaptive import LoadContext, current_load
    from ._bus import Bus, BusMessage
    from ._cache import Lookup, SyncTieredCache, TieredCache
    from ._decorator import (
        AsyncCachedFunction,
        AsyncCachedManyFunction,
        CachedFunction,
        CachedManyFunction,
        tiered_cache,
        tiered_cache_many,
    )
    from ._engine import Source
    from ._entry import Entry
    from ._errors import (
        CacheClosedError,
        ConfigurationError,
        InvalidKeyError,
        LoaderTimeoutError,
        SerializationError,
        TierCacheError,
        TierError,
        ValueTooLargeError,
    )
    from ._events import Event, EventHook, EventKind
    from ._serde import Codec, JsonCodec
    from ._tier import LeaseTier, Tier, TierBinding

__version__ = "0.1.0"

__all__ = [
    "AsyncCachedFunction",
    "AsyncCachedManyFunction",
    "Bus",
    "BusMessage",
    "CacheClosedError",
    "CachedFunction",
    "CachedManyFunction",
    "Codec",
    "ConfigurationError",
    "Entry",
    "Event",
    "EventHook",
    "EventKind",
    "InvalidKeyError",
    "JsonCodec",
    "LoadContext",
    "LeaseTier",
    "LoaderTimeoutError",
    "Lookup",
    "SerializationError",
    "Source",
    "SyncTieredCache",
    "Tier",
    "TierBinding",
    "TierCacheError",
    "TierError",
    "TieredCache",
    "ValueTooLargeError",
    "current_load",
    "tiered_cache",
    "tiered_cache_many",
]


# name -> the private module that defines it
_EXPORTS = {
    "AsyncCachedFunction": "._decorator",
    "AsyncCachedManyFunction": "._decorator",
    "Bus": "._bus",
    "BusMessage": "._bus",
    "CacheClosedError": "._errors",
    "CachedFunction": "._decorator",
    "CachedManyFunction": "._decorator",
    "Codec": "._serde",
    "ConfigurationError": "._errors",
    "Entry": "._entry",
    "Event": "._events",
    "EventHook": "._events",
    "EventKind": "._events",
    "InvalidKeyError": "._errors",
    "JsonCodec": "._serde",
    "LeaseTier": "._tier",
    "LoadContext": "._adaptive",
    "LoaderTimeoutError": "._errors",
    "Lookup": "._cache",
    "SerializationError": "._errors",
    "Source": "._engine",
    "SyncTieredCache": "._cache",
    "Tier": "._tier",
    "TierBinding": "._tier",
    "TierCacheError": "._errors",
    "TierError": "._errors",
    "TieredCache": "._cache",
    "ValueTooLargeError": "._errors",
    "current_load": "._adaptive",
    "tiered_cache": "._decorator",
    "tiered_cache_many": "._decorator",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tiercache' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
