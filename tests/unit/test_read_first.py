"""A flight's leader reads the lease tier first, and once more under the lease, never more.

A fresh answer there is returned at once (and back-filled); anything else leads to the lease and
one re-read under it, so a cold key costs two reads, a hit one (as events and counters show).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tiercache import EventKind, TieredCache
from tiercache._events import Event
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier


def chain(remote: FakeRemoteTier, clock: FakeClock, events: list[Event] | None = None) -> TieredCache:
    hook = events.append if events is not None else None
    return TieredCache(
        [MemoryTier(max_entries=100), remote],
        clock=clock,
        namespace="rf",
        ttl=10,
        stale_ttl=20,
        on_event=hook,
    )


def run(cache: TieredCache, use_async: bool, key: str, loader: Any, **options: Any) -> Any:
    if use_async:

        async def call() -> Any:
            return await cache.lookup(key, loader, **options)

        return asyncio.run(call())
    return cache.sync.lookup(key, loader, **options)


def kinds(events: list[Event], tier: str) -> list[str]:
    return [e.kind for e in events if e.tier == tier]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_000_000.0)


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_lease_tier_hit_is_answered_before_the_flow_and_backfilled(clock: FakeClock, use_async: bool) -> None:
    store: dict[str, tuple[bytes, float]] = {}
    chain(FakeRemoteTier(store, leases=True), clock).sync.set("k", "shared")  # another process
    remote = FakeRemoteTier(store, leases=True)
    events: list[Event] = []
    cache = chain(remote, clock, events)
    got = run(cache, use_async, "k", lambda: "loaded")
    assert (got.value, got.source, got.tier) == ("shared", "L2", "remote")
    assert remote.calls["get"] == 1 and remote.calls["lease"] == 0
    assert kinds(events, "remote") == [EventKind.HIT]
    assert EventKind.BACKFILL in kinds(events, "memory")
    assert cache.sync.lookup("k", lambda: "loaded").source == "L1"  # back-filled
    assert cache._rt.flights.get("rf:k") is None


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_miss_reads_the_lease_tier_once_before_and_once_under_the_lease(
    clock: FakeClock, use_async: bool
) -> None:
    remote = FakeRemoteTier(leases=True)
    events: list[Event] = []
    cache = chain(remote, clock, events)
    calls: list[int] = []

    def load() -> str:
        calls.append(1)
        return "loaded"

    got = run(cache, use_async, "cold", load)
    assert (got.value, got.source, calls) == ("loaded", "LOADED", [1])
    # Read before the flight, then again once the lease is held (a flight that finished in
    # between has written there): the same two reads as before the shortcut, never three.
    assert remote.calls["get"] == 2 and remote.calls["lease"] == 2  # acquire + release
    # ...but one miss: the re-read checks for a racing flight, it is not a second lookup
    # (hit ratio = hits / (hits + misses) must see one cold load as one miss)
    assert kinds(events, "remote").count(EventKind.MISS) == 1
    assert cache.stats.tiers[1].misses == 1


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_stale_answer_goes_to_the_flight_as_its_first_read(clock: FakeClock, use_async: bool) -> None:
    remote = FakeRemoteTier(leases=True)
    cache = chain(remote, clock)
    cache.sync.set("k", "old")
    cache._rt.tiers[0].clear("rf:")  # type: ignore[attr-defined]  # only the shared copy is left
    clock.advance(15)  # stale (fresh 10 s, stale until 30 s)

    def failing() -> str:
        raise RuntimeError("database down")

    before = remote.calls["get"]
    got = run(cache, use_async, "k", failing, fail_safe=True)
    assert (got.value, got.source) == ("old", "STALE_FAILSAFE")
    assert remote.calls["get"] - before == 2  # the first read, the re-read under the lease; no third


def test_tiers_without_a_lease_keep_the_flight_first(clock: FakeClock) -> None:
    remote = FakeRemoteTier()
    cache = chain(remote, clock)
    assert cache.sync.get_cached("cold", lambda: "loaded") == "loaded"
    assert remote.calls["get"] == 1


def test_lease_below_a_first_remote_tier_keeps_the_flight_first(clock: FakeClock) -> None:
    cache = TieredCache(
        [MemoryTier(max_entries=10), FakeRemoteTier(name="kv"), FakeRemoteTier(name="redis", leases=True)],
        clock=clock,
        namespace="rf",
    )
    assert cache.sync.get_cached("cold", lambda: "loaded") == "loaded"


def test_concurrent_cold_callers_load_once(clock: FakeClock) -> None:
    remote = FakeRemoteTier(leases=True)
    cache = chain(remote, clock)
    loads: list[int] = []

    async def load() -> str:
        loads.append(1)
        await asyncio.sleep(0.05)
        return "v"

    async def scenario() -> list[Any]:
        return await asyncio.gather(*(cache.get_cached("hot", load) for _ in range(100)))

    assert asyncio.run(scenario()) == ["v"] * 100
    assert loads == [1]
    # The fake answers without suspending, so the first caller has opened the flight before the
    # second runs: its read, its re-read under the lease, and 99 joiners that read nothing.
    # (Against Redis the first tick's readers are coalesced: tests/integration, the stampede.)
    assert remote.calls["get"] == 2 and remote.calls["get_many"] == 0


class SlowRemote(FakeRemoteTier):
    """Answers async reads after a pause, so concurrent callers interleave as with a network."""

    async def aget(self, key: str) -> Any:
        await asyncio.sleep(0.01)
        return self.get(key)


def test_concurrent_callers_of_a_stale_key_all_get_it_under_swr(clock: FakeClock) -> None:
    remote = SlowRemote(leases=True)
    cache = chain(remote, clock)
    cache.sync.set("k", "old")
    cache._rt.tiers[0].clear("rf:")  # type: ignore[attr-defined]
    clock.advance(15)
    loads: list[int] = []

    async def load() -> str:
        loads.append(1)
        await asyncio.sleep(0.2)
        return "new"

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(cache.lookup("k", load, swr=True))
        await asyncio.sleep(0.005)  # the second caller arrives while the first one's read runs
        second = asyncio.ensure_future(cache.lookup("k", load, swr=True))
        results = [await first, await second]
        await asyncio.sleep(0.05)  # the one background refresh has started its load
        return results

    results = asyncio.run(scenario())
    assert [r.value for r in results] == ["old", "old"]  # nobody waits for the refresh
    assert loads == [1]


def test_concurrent_cold_callers_share_a_failing_load(clock: FakeClock) -> None:
    remote = SlowRemote(leases=True)
    cache = chain(remote, clock)
    loads: list[int] = []

    async def load() -> str:
        loads.append(1)
        raise RuntimeError("database down")

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(cache.get_cached("cold", load))
        await asyncio.sleep(0.005)
        second = asyncio.ensure_future(cache.get_cached("cold", load))
        return await asyncio.gather(first, second, return_exceptions=True)

    results = asyncio.run(scenario())
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    assert loads == [1]  # the second caller joined the first one's flight
