"""The tier protocol: what the core asks of a storage layer, and the optional lease capability.

A tier stores :class:`Entry` objects under full (namespaced) keys. It has sync and async faces
because one cache serves both kinds of caller; an in-process tier's async methods simply call the
sync ones. Everything a tier raises is caught by the core: a failed read is a miss, a failed write
is a counted skip, and repeated failures open the tier's circuit breaker.

Contract (checked by ``tiercache.testing.TierContract``):

* ``get`` returns an entry stored under ``key`` that is not past ``stale_until``, or None;
* ``set`` keeps the entry for at most ``min(max_ttl, stale_until - now)`` and never replaces a
  stored entry of a *higher* version (a late result must not overwrite a newer write); a shared
  tier returns False when it refused for that reason (True or None otherwise), so the core keeps
  the refused entry out of L1 as well;
* ``delete(key, version)`` removes the key; a tier that can should also refuse, for a short while,
  a ``set`` of an entry older than ``version`` (a tombstone);
* ``get_many``/``set_many`` behave as repeated ``get``/``set`` but may do it in one round trip.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ._entry import Entry
from ._events import Event, EventHook
from ._serde import Codec, JsonCodec

__all__ = [
    "CountsOwnHits",
    "ExpiringTier",
    "ExtendableLease",
    "InlineL1",
    "InlineSlot",
    "LeaseTier",
    "NamespaceClearingTier",
    "SizeLimited",
    "TagStore",
    "Tier",
    "TierBinding",
]


def _no_events(event: Event) -> None:
    return None


@dataclass(frozen=True)
class TierBinding:
    """What a cache hands its tiers when it adopts them: one clock, one codec, the namespace."""

    clock: Callable[[], float] = time.time
    codec: Codec = field(default_factory=JsonCodec)
    namespace: str = "tc"
    on_event: EventHook = _no_events
    redact_keys: bool = False  # keep keys out of the tier's own logs (and its HTTP client's)


@runtime_checkable
class Tier(Protocol):
    """A storage layer of the chain. See the module docstring for the contract."""

    name: str
    in_process: bool  # read by every caller before single-flight (L1); must be cheap
    shared: bool  # visible to other processes
    max_ttl: float | None  # the longest this tier keeps anything, seconds (None: no limit)

    def bind(self, binding: TierBinding) -> None: ...

    def get(self, key: str) -> Entry | None: ...

    def set(self, key: str, entry: Entry) -> bool | None: ...

    def delete(self, key: str, version: int) -> None: ...

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]: ...

    def set_many(self, items: Sequence[tuple[str, Entry]]) -> None: ...

    def close(self) -> None: ...

    async def aget(self, key: str) -> Entry | None: ...

    async def aset(self, key: str, entry: Entry) -> bool | None: ...

    async def adelete(self, key: str, version: int) -> None: ...

    async def aget_many(self, keys: Sequence[str]) -> list[Entry | None]: ...

    async def aset_many(self, items: Sequence[tuple[str, Entry]]) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class LeaseTier(Protocol):
    """A shared tier that can arbitrate which process loads a key (distributed single-flight).

    ``acquire_lease`` returns a token when this caller now holds the lease, None when someone else
    does. ``wait_for_entry`` blocks (without busy-polling) until the key is written, the lease is
    released, or ``timeout`` seconds pass, and returns what it then reads (or None).
    """

    offers_lease: bool

    def acquire_lease(self, key: str, ttl: float) -> str | None: ...

    def release_lease(self, key: str, token: str) -> None: ...

    def wait_for_entry(self, key: str, timeout: float) -> Entry | None: ...

    async def aacquire_lease(self, key: str, ttl: float) -> str | None: ...

    async def arelease_lease(self, key: str, token: str) -> None: ...

    async def await_for_entry(self, key: str, timeout: float) -> Entry | None: ...


# --- optional capabilities (declared protocols; the core checks them with isinstance, once) -----


@runtime_checkable
class ExtendableLease(Protocol):
    """A lease tier that can push a held lease's expiry forward while a slow load runs (the core
    extends every third of ``lease_ttl``); False when the lease is no longer ours."""

    def extend_lease(self, key: str, token: str, ttl: float) -> bool: ...

    async def aextend_lease(self, key: str, token: str, ttl: float) -> bool: ...


@runtime_checkable
class SizeLimited(Protocol):
    """A tier that refuses encoded entries over ``max_value_bytes`` (None: no limit). The core
    then skips that tier for the entry (counted as ValueTooLargeError) instead of calling it."""

    max_value_bytes: int | None


@runtime_checkable
class CountsOwnHits(Protocol):
    """A tier that counts its own hits (including those the inline path takes without the
    core): ``cache.stats`` asks it instead of counting them a second time."""

    def hit_count(self) -> int: ...


class InlineSlot(Protocol):
    """What :class:`InlineL1`'s lookup returns for a stored key: the entry, and the hit mark.

    ``visited`` is the tier's own hit bookkeeping; the inline path records a hit by storing
    ``slot.visited = slot.visited.next`` (counted) or ``slot.visited = tier.marks[1]`` (hits
    not counted, ``metrics=False``). Both are a single attribute store, no call."""

    @property
    def entry(self) -> Entry: ...

    visited: Any


@runtime_checkable
class InlineL1(Protocol):
    """An in-process tier that the decorators' and ``get_cached``'s inline hit path reads
    directly, without entering the drivers: any first tier offering this gets the fast path.

    ``fast_lookup(key)`` returns an :class:`InlineSlot` or None and must be safe to call from
    any thread without a lock (``dict.get`` is). The entry must be checked by the caller
    (fresh_until, tags); a slot is never for another key. ``marks`` is the tier's ring of hit
    marks: ``marks[1]`` is the mark an uncounted hit stores. Hits recorded this way must show
    in ``hit_count()``."""

    @property
    def fast_lookup(self) -> Callable[[str], InlineSlot | None]: ...

    @property
    def marks(self) -> Sequence[Any]: ...

    def hit_count(self) -> int: ...


@runtime_checkable
class ExpiringTier(Protocol):
    """A tier that can mark an entry stale in place, atomically (``cache.expire``).

    ``expire(key, at, version)``: if an entry is stored under ``key``, lower its ``fresh_until``
    to ``min(fresh_until, at)``, keep its ``stale_until`` and value (it stays usable for
    fail-safe), and give it ``version`` so that no older write can bring the fresh copy back.
    Tiers without this capability are expired by the core with a read and a write.
    """

    def expire(self, key: str, at: float, version: int) -> None: ...

    async def aexpire(self, key: str, at: float, version: int) -> None: ...


@runtime_checkable
class NamespaceClearingTier(Protocol):
    """A tier that can remove every key starting with ``prefix`` (``cache.clear``).

    Shared tiers must touch nothing outside the prefix (no FLUSHDB/FLUSHALL): SCAN + UNLINK in
    batches on Redis, on every primary of a Cluster. Returns how many keys were removed.
    """

    def clear(self, prefix: str) -> int: ...

    async def aclear(self, prefix: str) -> int: ...


@runtime_checkable
class TagStore(Protocol):
    """A shared tier that keeps one invalidation time per tag (``cache.invalidate_tags``).

    Times are Unix seconds; an entry whose ``created_at`` is at or before the time of any of its
    tags is invalid. ``set_tag_times`` must be one round trip whatever the number of entries
    carrying the tags (O(1) invalidation); times only ever move forward (keep the max).
    Tag names are scoped by the tier's bound namespace.
    """

    def get_tag_times(self, tags: Sequence[str]) -> list[float | None]: ...

    def set_tag_times(self, tags: Sequence[str], at: float) -> None: ...

    async def aget_tag_times(self, tags: Sequence[str]) -> list[float | None]: ...

    async def aset_tag_times(self, tags: Sequence[str], at: float) -> None: ...
