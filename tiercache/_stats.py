"""Counters a cache keeps about itself: per tier and per cache, cheap enough to leave on.

They are plain integers bumped without locks: exact for asyncio, approximate when many threads hit
the same cache at once (an increment can be lost, never invented). A tier that counts its own hits
(MemoryTier, whose SIEVE mark is a hit count) is asked for them instead: that is how hits taken on
the inline hit path are counted without a second increment there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._events import EventKind

__all__ = ["CacheStats", "TierStats"]


@dataclass
class TierStats:
    """What happened at one tier."""

    name: str
    level: int  # 1 for the first tier (L1), 2 for the next...
    hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    backfills: int = 0
    errors: int = 0
    skipped: int = 0  # calls not made because the tier's breaker was open
    corrupt: int = 0
    breaker_opened: int = 0
    breaker_closed: int = 0
    tag_invalid: int = 0  # entries found but invalidated by a tag (counted as misses too)


@dataclass
class CacheStats:
    """Counters of one TieredCache (``cache.stats``)."""

    tiers: list[TierStats]
    loads: int = 0
    load_errors: int = 0
    load_seconds: float = 0.0
    joins: int = 0
    stale_served: int = 0
    lease_waits: int = 0
    lease_wait_seconds: float = 0.0
    bus_messages: int = 0
    bus_gaps: int = 0
    own_hits: list[Callable[[], int] | None] = field(default_factory=list)

    def tier_hits(self, index: int) -> int:
        """Hits of tier ``index``, including those taken on the inline L1 hit path."""
        counter = self.own_hits[index] if index < len(self.own_hits) else None
        if counter is None:
            return self.tiers[index].hits
        t = self.tiers[index]  # the tier counts every read that found an entry: keep the fresh ones
        return max(0, counter() - t.stale_hits - t.tag_invalid)

    def snapshot(self) -> dict[str, Any]:
        """All counters as plain data (for logs, tests and exporters)."""
        tiers = []
        for i, t in enumerate(self.tiers):
            row = {k: v for k, v in vars(t).items()}
            row["hits"] = self.tier_hits(i)
            tiers.append(row)
        return {
            "tiers": tiers,
            "loads": self.loads,
            "load_errors": self.load_errors,
            "load_seconds": self.load_seconds,
            "joins": self.joins,
            "stale_served": self.stale_served,
            "lease_waits": self.lease_waits,
            "lease_wait_seconds": self.lease_wait_seconds,
            "bus_messages": self.bus_messages,
            "bus_gaps": self.bus_gaps,
        }

    def __repr__(self) -> str:
        # the counters, with the tiers' own hit counts read (not the functions that read them)
        snap = self.snapshot()
        tiers = []
        for t in snap.pop("tiers"):
            name, level = t.pop("name"), t.pop("level")
            shown = " ".join(f"{k}={v}" for k, v in t.items() if v or k in ("hits", "misses"))
            tiers.append(f"{name}(L{level}): {shown}")
        rest = ", ".join(f"{k}={round(v, 6) if isinstance(v, float) else v}" for k, v in snap.items())
        return f"CacheStats([{', '.join(tiers)}], {rest})"

    def count(self, kind: str, tier: int | None, duration: float | None) -> None:
        """Record one event (called by the runtime for every event, hook or not)."""
        if kind == EventKind.LEASE_WAIT:
            self.lease_waits += 1
            self.lease_wait_seconds += duration or 0.0
            return
        if tier is not None:
            field_name = _TIER_FIELDS.get(kind)
            if field_name is not None:
                t = self.tiers[tier]
                setattr(t, field_name, getattr(t, field_name) + 1)
            return
        field_name = _CACHE_FIELDS.get(kind)
        if field_name is not None:
            setattr(self, field_name, getattr(self, field_name) + 1)
        if kind in (EventKind.LOAD, EventKind.LOAD_ERROR):
            self.load_seconds += duration or 0.0


# event kind -> the counter it bumps
_TIER_FIELDS = {
    EventKind.HIT: "hits",
    EventKind.MISS: "misses",
    EventKind.STALE_HIT: "stale_hits",
    EventKind.BACKFILL: "backfills",
    EventKind.TIER_ERROR: "errors",
    EventKind.TIER_SKIPPED: "skipped",
    EventKind.CORRUPT: "corrupt",
    EventKind.BREAKER_OPEN: "breaker_opened",
    EventKind.BREAKER_CLOSED: "breaker_closed",
}
_CACHE_FIELDS = {
    EventKind.LOAD: "loads",
    EventKind.LOAD_ERROR: "load_errors",
    EventKind.JOIN: "joins",
    EventKind.STALE_SERVED: "stale_served",
    EventKind.BUS_MESSAGE: "bus_messages",
    EventKind.BUS_GAP: "bus_gaps",
}
