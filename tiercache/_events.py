"""The event hook: what the cache reports about each call, for metrics and logs built on top."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["Event", "EventHook", "EventKind"]

logger = logging.getLogger("tiercache")


class EventKind:
    """Names of the events (plain strings, cheap to compare and to use as metric labels)."""

    HIT = "hit"  # a fresh entry was found in ``tier``
    STALE_HIT = "stale_hit"  # a stale entry was found in ``tier`` (remembered, walk goes on)
    MISS = "miss"  # ``tier`` had nothing usable
    BACKFILL = "backfill"  # an entry was copied up into ``tier``
    LOAD = "load"  # the loader ran and returned (``duration`` seconds)
    LOAD_ERROR = "load_error"  # the loader raised ``error``
    JOIN = "join"  # the caller joined an in-process flight already running for the key
    TIER_ERROR = "tier_error"  # ``tier`` raised ``error``; read counted as a miss, write skipped
    TIER_SKIPPED = "tier_skipped"  # ``tier``'s circuit breaker is open; the tier was not called
    BREAKER_OPEN = "breaker_open"  # ``tier`` failed repeatedly and is skipped for a cool-down
    BREAKER_CLOSED = "breaker_closed"  # ``tier`` answered again after a cool-down
    CORRUPT = "corrupt"  # ``tier`` held bytes under our key that are not a valid entry
    STALE_SERVED = "stale_served"  # a stale entry was returned (fail-safe or SWR)
    LEASE_WAIT = "lease_wait"  # waited ``duration`` s at ``tier`` for another process's load
    BUS_MESSAGE = "bus_message"  # an invalidation message from another process was applied
    BUS_GAP = "bus_gap"  # messages were lost (sequence gap, reconnect): L1 was cleared


class Event(NamedTuple):
    """One thing that happened. ``tier`` is the tier's name, or None for cache-level events."""

    kind: str
    key: str
    tier: str | None = None
    duration: float | None = None
    error: BaseException | None = None
    source: str | None = None  # for STALE_SERVED: "STALE_SWR" or "STALE_FAILSAFE"


EventHook = Callable[[Event], None]


def emit_safely(hook: EventHook, event: Event) -> None:
    """Call the user's hook; a hook that raises is logged, never allowed to break a request."""
    try:
        hook(event)
    except Exception:
        logger.exception("event hook raised on %s", event.kind)
