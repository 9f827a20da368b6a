"""In-process single-flight: asyncio tasks and threads on one cold key share one load."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeRemoteTier


def make_cache() -> TieredCache:
    return TieredCache([MemoryTier(), FakeRemoteTier()], ttl=60)


def test_1000_tasks_on_one_cold_key_call_the_loader_once() -> None:
    cache = make_cache()
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return "v"

    async def main() -> list[str]:
        return await asyncio.gather(*(cache.get_cached("cold", load) for _ in range(1000)))

    assert asyncio.run(main()) == ["v"] * 1000
    assert calls == 1


def test_100_tasks_on_a_cold_key_make_one_remote_read() -> None:
    remote = FakeRemoteTier()
    cache = TieredCache([MemoryTier(), remote])

    async def main() -> None:
        await asyncio.gather(*(cache.get_cached("cold", lambda: 1) for _ in range(100)))

    asyncio.run(main())
    assert remote.calls["get"] == 1


def test_50_threads_on_one_cold_key_call_the_loader_once() -> None:
    cache = make_cache()
    calls = 0
    lock = threading.Lock()
    start = threading.Barrier(50)

    def load() -> str:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.1)
        return "v"

    def worker() -> str:
        start.wait()
        return cache.sync.get_cached("cold", load)

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: worker(), range(50)))
    assert results == ["v"] * 50
    assert calls == 1


def test_threads_and_tasks_join_one_flight() -> None:
    cache = make_cache()
    calls = 0
    release = threading.Event()

    def load() -> str:
        nonlocal calls
        calls += 1
        release.wait(5)
        return "v"

    results: list[str] = []
    leader = threading.Thread(target=lambda: results.append(cache.sync.get_cached("k", load)))
    leader.start()
    while cache._rt.flights.get("tc:k") is None:
        time.sleep(0.001)

    async def tasks() -> list[str]:
        waiting = [asyncio.ensure_future(cache.get_cached("k", load)) for _ in range(20)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*waiting)

    threaded = [
        threading.Thread(target=lambda: results.append(cache.sync.get_cached("k", load))) for _ in range(5)
    ]
    for t in threaded:
        t.start()
    assert asyncio.run(tasks()) == ["v"] * 20
    for t in [leader, *threaded]:
        t.join(5)
    assert results == ["v"] * 6
    assert calls == 1


def test_async_leader_with_thread_joiners() -> None:
    cache = make_cache()
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return "v"

    thread_results: list[str] = []

    async def main() -> str:
        task = asyncio.ensure_future(cache.get_cached("k", load))
        await asyncio.sleep(0.01)
        threads = [
            threading.Thread(
                target=lambda: thread_results.append(cache.sync.get_cached("k", lambda: "thread-load"))
            )
            for _ in range(10)
        ]
        for t in threads:
            t.start()
        value = await task
        for t in threads:
            await asyncio.to_thread(t.join, 5)
        return value

    assert asyncio.run(main()) == "v"
    assert thread_results == ["v"] * 10
    assert calls == 1


def test_loader_exception_reaches_every_joined_caller_and_the_next_call_retries() -> None:
    cache = make_cache()
    calls = 0
    boom = RuntimeError("db down")

    async def load() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        if calls == 1:
            raise boom
        return "recovered"

    async def main() -> None:
        results = await asyncio.gather(
            *(cache.get_cached("k", load) for _ in range(200)), return_exceptions=True
        )
        assert all(r is boom for r in results)
        assert calls == 1
        assert await cache.get_cached("k", load) == "recovered"
        assert calls == 2

    asyncio.run(main())


def test_sync_loader_exception_reaches_every_thread_and_nothing_deadlocks() -> None:
    cache = make_cache()
    calls = 0
    gate = threading.Barrier(20)

    def load() -> str:
        nonlocal calls
        calls += 1
        time.sleep(0.05)
        raise KeyError("missing")

    def worker() -> BaseException | str:
        gate.wait()
        try:
            return cache.sync.get_cached("k", load)
        except KeyError as exc:
            return exc

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: worker(), range(20)))
    assert all(isinstance(r, KeyError) for r in results)
    assert calls == 1
    assert cache.sync.get_cached("k", lambda: "ok") == "ok"  # the key is not stuck


def test_a_cancelled_caller_does_not_cancel_the_flight_for_the_others() -> None:
    cache = make_cache()
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return "v"

    async def main() -> None:
        leader = asyncio.ensure_future(cache.get_cached("k", load))
        await asyncio.sleep(0)
        others = [asyncio.ensure_future(cache.get_cached("k", load)) for _ in range(10)]
        await asyncio.sleep(0.02)
        leader.cancel()
        others[0].cancel()
        results = await asyncio.gather(*others[1:])
        assert results == ["v"] * 9
        with pytest.raises(asyncio.CancelledError):
            await leader
        assert calls == 1
        assert await cache.get("k") == "v"  # the cancelled leader's flight still stored the value

    asyncio.run(main())


def test_aclose_finishes_background_work_without_warnings(recwarn: pytest.WarningsRecorder) -> None:
    cache = TieredCache([MemoryTier()], ttl=1, stale_ttl=60, swr=True)

    async def main() -> None:
        await cache.set("k", "old", ttl=0.001)
        await asyncio.sleep(0.01)

        async def slow() -> str:
            await asyncio.sleep(10)
            return "new"

        assert await cache.get_cached("k", slow) == "old"  # SWR: stale at once, refresh behind
        assert len(cache._rt.tasks) == 1
        await cache.aclose(grace=0.05)
        assert all(t.done() for t in cache._rt.tasks)

    asyncio.run(main())
    assert not [w for w in recwarn if "never" in str(w.message) or "destroyed" in str(w.message)]
