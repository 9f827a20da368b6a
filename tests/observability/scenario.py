"""A scripted run of one cache (hit, miss, L2 hit, stale/fail-safe, tier down → breaker) shared by
the OpenTelemetry and Prometheus tests, with the counter values it must produce."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from tiercache import Event, TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier


class Boom(Exception):
    """The loader failure the scenario injects."""


@dataclass
class World:
    clock: FakeClock
    l1: MemoryTier
    l2: FakeRemoteTier
    cache: TieredCache
    events: list[Event] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def new_world(namespace: str | None = None) -> World:
    clock = FakeClock()
    l1, l2 = MemoryTier(), FakeRemoteTier(name="remote")
    events: list[Event] = []
    cache = TieredCache(
        [l1, l2],
        clock=clock,
        ttl=10,
        stale_ttl=100,
        namespace=namespace or f"obs{uuid.uuid4().hex[:8]}",
        breaker_threshold=2,
        breaker_cooldown=5,
        on_event=events.append,  # a user's hook: must keep working once instrumented
    )
    return World(clock, l1, l2, cache, events)


def load_ok() -> str:
    return "v"


def load_fails() -> Any:
    raise Boom("database down")


def miss_then_hit(w: World) -> None:
    """Cold key: L2 miss + load. Then two inline L1 hits."""
    w.sources.append(w.cache.sync.lookup("a", load_ok).source)  # LOADED
    w.sources.append(w.cache.sync.lookup("a", load_ok).source)  # L1
    assert w.cache.sync.get_cached("a", load_ok) == "v"  # L1 (inline)


def l2_hit(w: World) -> None:
    """L1 emptied: L2 hit, back-filled into L1."""
    w.l1.clear()
    w.sources.append(w.cache.sync.lookup("a", load_ok).source)  # L2


def stale_fail_safe(w: World) -> None:
    """Entry stale everywhere and the loader fails: the stale value is served."""
    w.clock.advance(20)
    w.sources.append(w.cache.sync.lookup("a", load_fails).source)  # STALE_FAILSAFE


def breaker(w: World) -> None:
    """The remote tier goes down: two errors open its breaker, the next call skips it; after the
    cool-down it answers again and the breaker closes."""
    w.l2.down = True
    for key in ("b1", "b2", "b3"):
        w.cache.sync.get_cached(key, load_ok)
    w.l2.down = False
    w.clock.advance(6)
    w.cache.sync.get_cached("b4", load_ok)


def run_all(w: World) -> None:
    miss_then_hit(w)
    l2_hit(w)
    stale_fail_safe(w)
    breaker(w)
    assert w.sources == ["LOADED", "L1", "L2", "STALE_FAILSAFE"]
