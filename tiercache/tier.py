"""The public interface for writing a tier: the protocols, the binding, and the core's helpers.

A tier implements :class:`Tier`; the optional capabilities below are separate protocols, each
checked once with ``isinstance`` when the cache is built (never probed per call). The bundled
adapters (``tiercache.adapters``) use only what this module exports, so a third-party tier can
do everything they do -- an in-process one included (:class:`InlineL1`: the inline hit path).
"""

from __future__ import annotations

from ._bus_wire import MAX_SKEW as MAX_CLOCK_SKEW
from ._entry import Entry
from ._errors import ConfigurationError, SerializationError, TierError, ValueTooLargeError
from ._events import Event, EventHook, EventKind, emit_safely
from ._keys import hashed_key
from ._serde import Codec, JsonCodec
from ._tag_seal import seal as seal_tag_time
from ._tag_seal import unseal as unseal_tag_time
from ._tier import (
    CountsOwnHits,
    ExpiringTier,
    ExtendableLease,
    InlineL1,
    InlineSlot,
    LeaseTier,
    NamespaceClearingTier,
    SizeLimited,
    TagStore,
    Tier,
    TierBinding,
)
from ._ttl import Duration, seconds

__all__ = [
    "Codec",
    "ConfigurationError",
    "CountsOwnHits",
    "Duration",
    "Entry",
    "Event",
    "EventHook",
    "EventKind",
    "ExpiringTier",
    "ExtendableLease",
    "InlineL1",
    "InlineSlot",
    "MAX_CLOCK_SKEW",
    "JsonCodec",
    "LeaseTier",
    "NamespaceClearingTier",
    "SerializationError",
    "SizeLimited",
    "TagStore",
    "Tier",
    "TierBinding",
    "TierError",
    "ValueTooLargeError",
    "emit_safely",
    "hashed_key",
    "seal_tag_time",
    "unseal_tag_time",
    "seconds",
]
