"""Freshness and failure semantics: SWR, fail-safe throttle, timeouts, early refresh, jitter, adaptive."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import threading
import time
from typing import Any

import pytest

from tiercache import LoaderTimeoutError, TieredCache, current_load
from tiercache._policy import Policy
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier, make_entry


def chain(clock: FakeClock | None = None, **kw: Any) -> TieredCache:
    return TieredCache([MemoryTier(), FakeRemoteTier()], clock=clock or FakeClock(), namespace="f", **kw)


# --- stale-while-revalidate ------------------------------------------------------------------


def test_swr_returns_stale_at_once_and_refreshes_once_in_the_background() -> None:
    clock = FakeClock()
    cache = chain(clock, ttl=10, stale_ttl=100, swr=True)
    calls = 0
    release = asyncio.Event

    async def main() -> None:
        nonlocal calls
        gate = release()

        async def slow() -> str:
            nonlocal calls
            calls += 1
            await gate.wait()
            return "new"

        await cache.set("k", "old")
        clock.advance(11)
        started = time.monotonic()
        results = await asyncio.gather(*(cache.get_cached("k", slow) for _ in range(50)))
        assert results == ["old"] * 50 and time.monotonic() - started < 0.5
        gate.set()
        await cache.aclose()  # finishes the tracked refresh
        assert await cache.get("k") == "new"

    asyncio.run(main())
    assert calls == 1


def test_swr_in_sync_code_refreshes_in_a_thread() -> None:
    clock = FakeClock()
    cache = chain(clock, ttl=10, stale_ttl=100, swr=True)
    cache.sync.set("k", "old")
    clock.advance(11)
    assert cache.sync.get_cached("k", lambda: "new") == "old"
    for thread in list(cache._rt.threads):
        thread.join(5)
    assert cache.sync.get("k") == "new"


# --- fail-safe --------------------------------------------------------------------------------


def test_database_down_for_30_seconds_is_served_from_stale_one_attempt_per_throttle_window() -> None:
    """Three "processes" (own L1, one shared remote tier), a loader failing for 30 s of clock."""
    clock = FakeClock()
    store: dict[str, tuple[bytes, float]] = {}
    caches = [
        TieredCache(
            [MemoryTier(), FakeRemoteTier(store)],
            clock=clock,
            namespace="db",
            ttl=10,
            stale_ttl=3600,
            fail_safe_throttle=5,
        )
        for _ in range(3)
    ]
    caches[0].sync.set("report", "last good")
    clock.advance(10)  # stale from now on
    attempts: list[float] = []

    def database() -> str:
        attempts.append(clock())
        raise ConnectionError("database down")

    served = []
    for _ in range(60):  # 30 s in 0.5 s steps, every process asking every step
        for cache in caches:
            served.append(cache.sync.get_cached("report", database))
        clock.advance(0.5)
    assert set(served) == {"last good"}
    assert len(attempts) <= math.ceil(30 / 5) + 1
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 5 for gap in gaps)  # never two attempts inside one throttle window


def test_soft_timeout_serves_stale_and_stores_the_late_result() -> None:
    clock = FakeClock()
    cache = chain(clock, ttl=10, stale_ttl=100, soft_timeout=0.05)

    async def main() -> None:
        await cache.set("k", "old")
        clock.advance(11)

        async def slow() -> str:
            await asyncio.sleep(0.8)
            return "late but good"

        started = time.monotonic()
        assert await cache.get_cached("k", slow) == "old"
        assert time.monotonic() - started < 0.5  # answered long before the loader finished
        await cache.aclose(grace=2)
        assert await cache.get("k") == "late but good"

    asyncio.run(main())


def test_soft_timeout_without_stale_waits_for_the_loader() -> None:
    cache = chain(soft_timeout=0.01)

    async def slow() -> str:
        await asyncio.sleep(0.05)
        return "v"

    assert asyncio.run(cache.get_cached("k", slow)) == "v"


def test_sync_soft_timeout_runs_the_loader_in_a_thread() -> None:
    clock = FakeClock()
    cache = chain(clock, ttl=10, stale_ttl=100, soft_timeout=0.05)
    cache.sync.set("k", "old")
    clock.advance(11)
    done = threading.Event()

    def slow() -> str:
        time.sleep(0.2)
        done.set()
        return "late"

    assert cache.sync.get_cached("k", slow) == "old"
    assert done.wait(2)
    time.sleep(0.05)
    assert cache.sync.get("k") == "late"


# --- hard timeout ------------------------------------------------------------------------------


def test_hung_async_loader_is_cancelled_at_the_hard_timeout_and_waiters_are_released() -> None:
    cache = chain(hard_timeout=0.2)
    cancelled = asyncio.Event

    async def main() -> None:
        was_cancelled = cancelled()

        async def hung() -> str:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                was_cancelled.set()
                raise
            return "never"

        started = time.monotonic()
        results = await asyncio.gather(
            *(cache.get_cached("k", hung) for _ in range(20)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(r, LoaderTimeoutError) and isinstance(r, TimeoutError) for r in results)
        assert elapsed < 0.3
        await asyncio.wait_for(was_cancelled.wait(), 1)
        assert await cache.get_cached("k", lambda: "fresh load") == "fresh load"

    asyncio.run(main())


def test_hung_sync_loader_releases_callers_at_the_hard_timeout() -> None:
    cache = chain(hard_timeout=0.2)
    release = threading.Event()

    def hung() -> str:
        release.wait(10)
        return "too late"

    started = time.monotonic()
    with pytest.raises(LoaderTimeoutError):
        cache.sync.get_cached("k", hung)
    assert time.monotonic() - started < 0.4
    release.set()
    assert cache.sync.get_cached("k", lambda: "next") == "next"


# --- early refresh -----------------------------------------------------------------------------


def test_xfetch_probability_follows_exp_minus_t_over_beta_delta() -> None:
    policy = Policy(ttl=60, early_refresh_beta=1.0)
    rng = random.Random(1234)
    entry = make_entry("k", 1, 0.0, ttl=60, version=1)
    entry.delta = 2.0
    for remaining, expected in [(2.0, math.exp(-1)), (4.0, math.exp(-2)), (6.0, math.exp(-3))]:
        now = entry.fresh_until - remaining
        hits = sum(policy.wants_early_refresh(entry, now, rng.random()) for _ in range(20_000))
        assert hits / 20_000 == pytest.approx(expected, abs=0.01)
    # far from expiry practically never; at or past it always
    assert not any(policy.wants_early_refresh(entry, 0.0, rng.random()) for _ in range(10_000))
    assert policy.wants_early_refresh(entry, entry.fresh_until, 0.999)


def test_early_refresh_happens_before_expiry_once_per_key_and_rereads_the_shared_tier() -> None:
    clock = FakeClock()
    store: dict[str, tuple[bytes, float]] = {}
    cache = TieredCache(
        [MemoryTier(), FakeRemoteTier(store)], clock=clock, namespace="x", ttl=10, early_refresh_ratio=0.5
    )
    calls: list[float] = []
    release = threading.Event()

    def load() -> str:
        calls.append(clock())
        release.wait(5)
        return f"v{len(calls)}"

    release.set()
    assert cache.sync.get_cached("k", load) == "v1"
    release.clear()
    clock.advance(6)  # past half the fresh period: hits refresh in the background
    for _ in range(20):
        assert cache.sync.get_cached("k", load) == "v1"  # still fresh: served at once
    release.set()
    for thread in list(cache._rt.threads):
        thread.join(5)
    assert len(calls) == 2  # one refresh for 20 hits
    assert cache.sync.get("k") == "v2"
    # another node refreshed first: a refresh re-reads the shared tier and does not load
    other = TieredCache([MemoryTier(), FakeRemoteTier(store)], clock=clock, namespace="x", ttl=10)
    clock.advance(6)
    other.sync.set("k", "from another node")
    cache.sync.get_cached("k", load)
    for thread in list(cache._rt.threads):
        thread.join(5)
    assert len(calls) == 2
    assert cache.sync.get("k") == "from another node"


# --- jitter and adaptive caching ----------------------------------------------------------------


def test_ttl_jitter_spreads_expiries_within_the_bound() -> None:
    clock = FakeClock()
    l1 = MemoryTier(max_entries=1000)
    cache = TieredCache([l1], clock=clock, ttl=100, jitter=0.1)
    for i in range(300):
        cache.sync.get_cached(f"k{i}", lambda: 1)
    lifetimes = [l1.get(f"tc:k{i}").fresh_until - clock() for i in range(300)]  # type: ignore[union-attr]
    assert min(lifetimes) >= 90 and max(lifetimes) <= 110
    assert max(lifetimes) - min(lifetimes) > 10  # actually spread


def test_the_loader_can_shorten_the_ttl_or_decline_caching() -> None:
    clock = FakeClock()
    cache = chain(clock, ttl=600)

    def find(user: str | None) -> Any:
        ctx = current_load()
        assert ctx is not None
        if user is None:
            ctx.ttl = 5  # cache "not found" briefly
        if user == "secret":
            ctx.cache = False
        return user

    assert cache.sync.get_cached("none", lambda: find(None)) is None
    assert cache.sync.get_cached("secret", lambda: find("secret")) == "secret"
    assert cache.sync.get("secret", "absent") == "absent"
    clock.advance(6)
    assert cache.sync.get("none", "expired") == "expired"
    assert current_load() is None


def test_adaptive_caching_from_an_async_loader() -> None:
    cache = chain()

    async def load() -> int:
        ctx = current_load()
        assert ctx is not None
        ctx.set_tags(["dynamic"])
        return 7

    async def main() -> None:
        assert await cache.get_cached("k", load) == 7
        await asyncio.sleep(0.001)
        await cache.invalidate_tags("dynamic")
        assert await cache.get("k") is None

    asyncio.run(main())
