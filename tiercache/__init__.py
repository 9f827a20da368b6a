"""tiercache: multi-tier caching (in-process memory, Redis, Cloudflare KV) with stampede protection.

Imports nothing optional: ``tiercache.adapters.redis`` and ``tiercache.adapters.cloudflare_kv``
load their client libraries only when used.
"""

from ._adaptive import LoadContext, current_load
from ._bus import Bus, BusMessage
from ._cache import Lookup, SyncTieredCache, TieredCache
from ._decorator import AsyncCachedFunction, CachedFunction, tiered_cache
from ._entry import Entry
from ._errors import (
    ConfigurationError,
    InvalidKeyError,
    LoaderTimeoutError,
    SerializationError,
    TierCacheError,
    TierError,
    ValueTooLargeError,
)
from ._events import Event, EventHook, EventKind
from ._flow import Source
from ._serde import Codec, JsonCodec
from ._tier import LeaseTier, Tier, TierBinding

__version__ = "0.1.0"

__all__ = [
    "AsyncCachedFunction",
    "Bus",
    "BusMessage",
    "CachedFunction",
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
]
