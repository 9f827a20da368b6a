"""Lifecycle defects of the drivers (issue 12): loops that end under a flight, hung loaders,
late results, refused writes, swallowed cancels and bus resets. Each test failed before the fix."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest

from tiercache import LoaderTimeoutError, TieredCache
from tiercache._entry import Entry
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier


def _in_thread(fn: Any, timeout: float) -> list[Any]:
    """Run ``fn`` in a daemon thread; [result] if it returned within ``timeout``, else []."""
    out: list[Any] = []

    def run() -> None:
        out.append(fn())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return out


# --- 1. asyncio.run ending during a background refresh -------------------------------------------


class SlowReads(FakeRemoteTier):
    """A remote tier whose async reads take ``delay`` seconds (a Redis round trip in flight)."""

    delay = 0.0

    async def aget(self, key: str) -> Entry | None:
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.get(key)


def test_a_key_survives_asyncio_run_ending_during_a_background_refresh() -> None:
    clock = FakeClock()
    remote = SlowReads()
    cache = TieredCache([MemoryTier(), remote], ttl=1, stale_ttl=60, swr=True, clock=clock, auto_batch=False)

    async def load() -> str:
        return "v1"

    assert asyncio.run(cache.get_cached("k", load)) == "v1"
    clock.advance(1.2)
    remote.delay = 0.5  # the refresh's read is on its way when asyncio.run ends and cancels it
    assert asyncio.run(cache.get_cached("k", load)) == "v1"  # stale; the refresh left running
    remote.delay = 0.0
    # Later callers, sync or async, must not wait on the dead refresh.
    sync_result = _in_thread(lambda: cache.sync.get_cached("k", lambda: "v3", swr=False), 3.0)
    assert sync_result == ["v3"]


def test_a_joiner_of_a_flight_whose_loop_closed_starts_anew() -> None:
    remote = SlowReads()
    cache = TieredCache([MemoryTier(), remote], ttl=60, auto_batch=False)

    async def load() -> str:
        return "never"

    async def leader() -> None:
        asyncio.create_task(cache.get_cached("k", load))  # noqa: RUF006 - left to asyncio.run's end
        await asyncio.sleep(0.05)  # its read is in flight when the loop ends

    remote.delay = 0.5
    asyncio.run(leader())
    remote.delay = 0.0
    assert _in_thread(lambda: cache.sync.get_cached("k", lambda: "fresh"), 3.0) == ["fresh"]

    async def again() -> str:
        return "again"

    cache.sync.delete("k")
    remote.delay = 0.5
    asyncio.run(leader())
    remote.delay = 0.0
    assert _in_thread(lambda: asyncio.run(cache.get_cached("k", again)), 3.0) == ["again"]


# --- 2. a hung loader must not poison its key -----------------------------------------------------


def test_an_async_joiner_applies_its_own_hard_timeout_to_a_hung_flight() -> None:
    cache = TieredCache([MemoryTier(), FakeRemoteTier()], ttl=60)

    async def hung() -> str:
        await asyncio.Event().wait()
        return "never"

    async def ok() -> str:
        return "ok"

    async def main() -> str:
        first = asyncio.create_task(cache.get_cached("k", hung))
        await asyncio.sleep(0.05)
        first.cancel()  # its only caller gives up; the take-over keeps the hung flight
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        value = await asyncio.wait_for(cache.get_cached("k", ok, hard_timeout=0.2), 3.0)
        assert time.perf_counter() - t0 < 1.5
        # and the key is no longer poisoned for the next caller either
        assert await asyncio.wait_for(cache.get_cached("k", ok), 1.0) == "ok"
        return value

    assert asyncio.run(main()) == "ok"


def test_a_sync_joiner_applies_its_own_hard_timeout_to_a_hung_flight() -> None:
    cache = TieredCache([MemoryTier(), FakeRemoteTier()], ttl=60)
    release = threading.Event()

    def hung() -> str:
        release.wait(20)
        return "late"

    threading.Thread(target=lambda: cache.sync.get_cached("k", hung), daemon=True).start()
    time.sleep(0.05)
    try:
        result = _in_thread(lambda: cache.sync.get_cached("k", lambda: "ok", hard_timeout=0.2), 3.0)
        assert result == ["ok"]
    finally:
        release.set()


# --- 3. soft_timeout must not start duplicate loads ----------------------------------------------


def _stale_cache(clock: FakeClock, remote: FakeRemoteTier) -> TieredCache:
    cache = TieredCache([MemoryTier(), remote], ttl=1, stale_ttl=60, soft_timeout=0.1, clock=clock)
    cache.sync.set("k", "old")
    clock.advance(2)  # now stale everywhere
    return cache


def test_soft_timeout_keeps_one_sync_load_and_its_lease() -> None:
    clock = FakeClock()
    remote = FakeRemoteTier(leases=True)
    cache = _stale_cache(clock, remote)
    calls = 0
    lock = threading.Lock()

    def slow() -> str:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.6)
        return "new"

    end = time.perf_counter() + 0.45
    waits = []
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        assert cache.sync.get_cached("k", slow) == "old"
        waits.append(time.perf_counter() - t0)
        assert "tc:k" in remote.leases  # held while the load runs: no other process loads
        time.sleep(0.02)
    assert calls == 1
    assert waits[0] >= 0.09  # the first call waited its soft timeout ...
    assert max(waits[1:]) < 0.08  # ... later ones get stale at once: the load is known to be late
    deadline = time.perf_counter() + 2
    while cache.sync.get("k") != "new" and time.perf_counter() < deadline:
        time.sleep(0.02)
    assert cache.sync.get("k") == "new"
    assert "tc:k" not in remote.leases  # released once the late result was stored
    assert calls == 1


def test_soft_timeout_keeps_one_async_load_and_its_lease() -> None:
    clock = FakeClock()
    remote = FakeRemoteTier(leases=True)
    cache = _stale_cache(clock, remote)
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.6)
        return "new"

    async def main() -> None:
        end = time.perf_counter() + 0.45
        waits = []
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            assert await cache.get_cached("k", slow) == "old"
            waits.append(time.perf_counter() - t0)
            assert "tc:k" in remote.leases
            await asyncio.sleep(0.02)
        assert calls == 1
        assert waits[0] >= 0.09 and max(waits[1:]) < 0.08  # later calls do not wait again
        deadline = time.perf_counter() + 2
        while await cache.get("k") != "new" and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        assert await cache.get("k") == "new"
        assert "tc:k" not in remote.leases
        assert calls == 1

    asyncio.run(main())


# --- 4. a sync loader's late result after a hard timeout is stored ------------------------------


def test_a_sync_loaders_late_result_after_hard_timeout_is_stored() -> None:
    cache = TieredCache([MemoryTier(), FakeRemoteTier()], ttl=60, hard_timeout=0.1)

    def slow() -> str:
        time.sleep(0.3)
        return "late"

    with pytest.raises(LoaderTimeoutError):
        cache.sync.get_cached("k", slow)
    deadline = time.perf_counter() + 2
    while cache.sync.get("k") is None and time.perf_counter() < deadline:
        time.sleep(0.02)
    assert cache.sync.get("k") == "late"


def test_a_late_result_does_not_overwrite_a_newer_write() -> None:
    cache = TieredCache([MemoryTier(), FakeRemoteTier()], ttl=60, hard_timeout=0.1)
    arrived = threading.Event()

    def slow() -> str:
        time.sleep(0.3)
        arrived.set()
        return "late"

    with pytest.raises(LoaderTimeoutError):
        cache.sync.get_cached("k", slow)
    cache.sync.set("k", "newer")
    assert arrived.wait(2)
    time.sleep(0.05)
    assert cache.sync.get("k") == "newer"


# --- 5. L1 never keeps what the shared tier refused ---------------------------------------------


def test_l1_does_not_keep_a_load_the_shared_tier_refused_sync() -> None:
    store: dict[str, tuple[bytes, float]] = {}
    ours = TieredCache([MemoryTier(), FakeRemoteTier(store)], ttl=60)
    other = TieredCache([MemoryTier(), FakeRemoteTier(store)], ttl=60)  # "another process", no bus

    def load() -> str:
        other.sync.set("k", "newer")  # lands while our load runs
        return "late"

    assert ours.sync.get_cached("k", load) == "late"
    assert ours.sync.get("k") == "newer"
    assert ours.sync.get_cached("k", lambda: "x") == "newer"


def test_l1_does_not_keep_a_load_the_shared_tier_refused_async() -> None:
    store: dict[str, tuple[bytes, float]] = {}
    ours = TieredCache([MemoryTier(), FakeRemoteTier(store)], ttl=60)
    other = TieredCache([MemoryTier(), FakeRemoteTier(store)], ttl=60)

    async def load() -> str:
        await other.set("k", "newer")
        return "late"

    async def main() -> None:
        assert await ours.get_cached("k", load) == "late"
        assert await ours.get("k") == "newer"

    asyncio.run(main())


# --- 6. a cancel swallowed by the tier client still cancels the caller -------------------------


class SwallowingTier(FakeRemoteTier):
    """A remote tier whose read swallows a cancel that races its reply (redis-py's wait_for on
    Python 3.10/3.11 does this)."""

    async def aget(self, key: str) -> Entry | None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.2)
        return self.get(key)


@pytest.mark.parametrize("without_cancelling", [False, True], ids=["cancelling", "py310-path"])
def test_a_cancelled_leader_raises_even_when_the_tier_swallows_the_cancel(
    without_cancelling: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if without_cancelling:
        monkeypatch.setattr("tiercache._async._HAS_CANCELLING", False)
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        return "v"

    async def main() -> None:
        cache = TieredCache([MemoryTier(), SwallowingTier()], ttl=60, auto_batch=False)
        task = asyncio.create_task(cache.get_cached("k", load))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_asyncio_timeout_around_get_cached_is_not_missed() -> None:
    async def main() -> None:
        cache = TieredCache([MemoryTier(), SwallowingTier()], ttl=60, auto_batch=False)
        t0 = time.perf_counter()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cache.get_cached("k", lambda: "v"), 0.05)
        assert time.perf_counter() - t0 < 0.19

    asyncio.run(main())


# --- 7. a bus reset supersedes running reads and loads ------------------------------------------


class ResetDuringRead(FakeRemoteTier):
    """Its read is slow enough for a bus reconnect to happen while it is on its way back."""

    on_read: Any = None

    def get(self, key: str) -> Entry | None:
        entry = super().get(key)
        if self.on_read is not None:
            self.on_read()
        return entry


def test_a_bus_reset_keeps_a_read_in_flight_out_of_l1() -> None:
    remote = ResetDuringRead()
    l1 = MemoryTier()
    cache = TieredCache([l1, remote], ttl=60)
    cache.sync.set("k", "old")
    l1.clear("tc:")
    coherence = cache._rt.coherence
    remote.on_read = lambda: (coherence.on_reset(), coherence.on_reset())  # a reconnect
    assert cache.sync.get_cached("k", lambda: "x") == "old"
    remote.on_read = None
    assert l1.get("tc:k") is None  # the copy that was on its way back did not land in L1


def test_a_bus_reset_supersedes_a_running_load() -> None:
    l1 = MemoryTier()
    cache = TieredCache([l1, FakeRemoteTier()], ttl=60)
    coherence = cache._rt.coherence

    def load() -> str:
        coherence.on_reset()
        coherence.on_reset()
        return "v"

    assert cache.sync.get_cached("k", load) == "v"
    assert l1.get("tc:k") is None
