"""TieredCache over MemoryTier + RedisTier on real servers: back-fill, other processes, stampede, outage."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.redis_servers import CommandMonitor, RedisServer, purge_prefix
from tiercache import EventKind, TieredCache
from tiercache._events import Event
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier
from tiercache.testing import FakeClock

pytestmark = pytest.mark.redis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def namespace(shared_redis_url: str, redis_prefix: str) -> Iterator[str]:
    ns = "it" + uuid.uuid4().hex[:10]
    yield ns
    purge_prefix(shared_redis_url, redis_prefix)


def test_l2_hit_backfills_l1_with_the_remaining_lifetime(
    shared_redis_url: str, redis_prefix: str, namespace: str
) -> None:
    clock = FakeClock()
    writer = TieredCache(
        [RedisTier(url=shared_redis_url, prefix=redis_prefix)], ttl=60, namespace=namespace, clock=clock
    )
    memory = MemoryTier()
    reader = TieredCache(
        [memory, RedisTier(url=shared_redis_url, prefix=redis_prefix)],
        ttl=60,
        namespace=namespace,
        clock=clock,
    )
    try:
        written_at = clock()
        writer.sync.set("user:1", {"name": "Ada"})
        clock.advance(20)
        calls: list[int] = []

        def loader() -> object:
            calls.append(1)
            return "loaded"

        assert reader.sync.get_cached("user:1", loader) == {"name": "Ada"}
        assert calls == []
        l1 = memory.get(f"{namespace}:user:1")
        assert l1 is not None
        assert l1.stale_until == pytest.approx(written_at + 60)  # 40 s left, not a fresh 60
        clock.advance(41)  # past the entry's own expiry: gone from L1, and Redis's copy is dead too
        assert memory.get(f"{namespace}:user:1") is None
        assert reader.sync.get_cached("user:1", lambda: "loaded") == "loaded"
    finally:
        writer.sync.close()
        reader.sync.close()


def test_another_processes_set_is_seen_after_l1_expiry(
    shared_redis_url: str, redis_prefix: str, namespace: str
) -> None:
    clock = FakeClock()
    memory = MemoryTier(max_ttl=5)
    cache = TieredCache(
        [memory, RedisTier(url=shared_redis_url, prefix=redis_prefix)],
        ttl=60,
        namespace=namespace,
        clock=clock,
    )
    try:
        assert cache.sync.get_cached("cfg", lambda: "old") == "old"
        script = textwrap.dedent(f"""
            from tiercache import TieredCache
            from tiercache.adapters.redis import RedisTier
            cache = TieredCache([RedisTier(url={shared_redis_url!r}, prefix={redis_prefix!r})],
                                ttl=60, namespace={namespace!r})
            cache.sync.set("cfg", "new")
            cache.sync.close()
        """)
        subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=30)
        assert cache.sync.get_cached("cfg", lambda: "loader") == "old"  # L1 still holds its copy
        clock.advance(6)  # L1's max_ttl is over; the shared copy is still fresh
        assert cache.sync.get_cached("cfg", lambda: "loader") == "new"
    finally:
        cache.sync.close()


def test_stampede_across_processes_loads_once(redis_server: RedisServer) -> None:
    processes, callers, load_seconds = 4, 250, 0.2
    namespace = "st" + uuid.uuid4().hex[:8]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.stampede_worker",
                redis_server.url,
                namespace,
                "cold",
                str(callers),
                str(load_seconds),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        monitor = CommandMonitor(redis_server.port)
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        outs = []
        for w in workers:
            assert w.stdout is not None
            outs.append(json.loads(w.stdout.readline()))
            w.wait(timeout=30)
        monitor.stop()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert all(o["errors"] == [] for o in outs), outs
    assert sum(o["loads"] for o in outs) == 1, outs
    assert len({v for o in outs for v in o["values"]}) == 1  # every caller got the one loaded value
    sent = monitor.client_commands()
    per_process = len(sent) / processes
    print(
        f"\nstampede: {len(sent)} commands for {processes * callers} callers in {processes} processes "
        f"({per_process:.1f} per process, {len(sent) / (processes * callers):.3f} per caller): {sent}"
    )
    assert per_process <= 5, sent
    assert max(o["elapsed"] for o in outs) < load_seconds + 0.5


def test_redis_stopped_mid_load_callers_get_loader_results_and_breaker_recovers(
    redis_server: RedisServer,
) -> None:
    events: list[Event] = []
    cache = TieredCache(
        [MemoryTier(), RedisTier(url=redis_server.url)],
        ttl=60,
        namespace="out",
        breaker_threshold=3,
        breaker_cooldown=0.3,
        on_event=events.append,
    )
    raw = redis.Redis(port=redis_server.port)

    async def scenario() -> None:
        async def slow(value: str) -> str:
            await asyncio.sleep(0.1)
            return value

        async def call(i: int) -> tuple[str, float]:
            started = time.monotonic()
            value = await cache.get_cached(f"k{i}", lambda: slow(f"v{i}"))
            return value, time.monotonic() - started

        first = [asyncio.create_task(call(i)) for i in range(20)]
        await asyncio.sleep(0.03)  # the loads are running now
        redis_server.kill()
        results = await asyncio.gather(*first)
        assert [v for v, _ in results] == [f"v{i}" for i in range(20)]
        # Later calls while Redis is down: each bounded (connection refused fails fast).
        for i in range(20, 30):
            value, took = await call(i)
            assert value == f"v{i}"
            assert took < 0.1 + 0.2, took
        assert EventKind.BREAKER_OPEN in [e.kind for e in events]

        redis_server.start()
        restarted = time.monotonic()
        i = 100
        while True:
            await call(i)
            if raw.exists(f"tc:{{out:k{i}}}"):
                break
            assert time.monotonic() - restarted < 2.0, "the tier was not used again within 2 s"
            i += 1
            await asyncio.sleep(0.05)
        print(f"\nRedis used again {time.monotonic() - restarted:.2f} s after the restart")
        await cache.aclose()

    try:
        asyncio.run(scenario())
    finally:
        raw.close()


def test_database_down_for_30_seconds_across_3_caches_sharing_redis(
    shared_redis_url: str, redis_prefix: str
) -> None:
    """Issue 5: the loader fails for 30 s of injected time; three caches (each its own L1 and its
    own Redis connections, one Redis) serve the last good value throughout, and the failing
    database sees at most one attempt per fail-safe throttle window."""
    import itertools
    import math

    from tiercache.testing import FakeClock

    clock = FakeClock()
    namespace = f"dbdown-{redis_prefix}"
    caches = [
        TieredCache(
            [MemoryTier(), RedisTier(url=shared_redis_url, prefix=redis_prefix, socket_timeout=0.5)],
            clock=clock,
            namespace=namespace,
            ttl=10,
            stale_ttl=3600,
            fail_safe_throttle=5,
        )
        for _ in range(3)
    ]
    try:
        caches[0].sync.set("report", "last good")
        clock.advance(10)
        attempts: list[float] = []

        def database() -> str:
            attempts.append(clock())
            raise ConnectionError("database down")

        served = set()
        for _ in range(60):
            for cache in caches:
                served.add(cache.sync.get_cached("report", database))
            clock.advance(0.5)
        assert served == {"last good"}
        assert len(attempts) <= math.ceil(30 / 5) + 1
        assert all(b - a >= 5 for a, b in itertools.pairwise(attempts))
    finally:
        caches[0].sync.clear()
        for cache in caches:
            cache.sync.close()


def test_a_load_longer_than_the_lease_keeps_other_processes_waiting(
    shared_redis_url: str, redis_prefix: str
) -> None:
    """The leader extends its lease while the loader runs; a second "process" (own L1, own
    connections) arriving after the lease's first TTL still waits instead of loading too."""
    namespace = f"lease-{redis_prefix}"

    def make() -> TieredCache:
        return TieredCache(
            [MemoryTier(), RedisTier(url=shared_redis_url, prefix=redis_prefix, socket_timeout=0.5)],
            namespace=namespace,
            ttl=60,
            lease_ttl=0.3,
            lease_wait=5,
        )

    a, b = make(), make()
    loads: list[str] = []

    async def slow(who: str) -> str:
        loads.append(who)
        await asyncio.sleep(1.0)
        return f"loaded by {who}"

    async def main() -> list[str]:
        first = asyncio.ensure_future(a.get_cached("report", lambda: slow("a")))
        await asyncio.sleep(0.6)  # two lease TTLs later
        second = await b.get_cached("report", lambda: slow("b"))
        return [await first, second]

    try:
        assert asyncio.run(main()) == ["loaded by a", "loaded by a"]
        assert loads == ["a"]
        # the sync driver keeps its lease from a thread (another key: b's L1 holds "report")
        import threading

        results: list[str] = []

        def sync_slow(who: str) -> str:
            loads.append(who)
            time.sleep(1.0)
            return f"sync {who}"

        leader = threading.Thread(
            target=lambda: results.append(a.sync.get_cached("report2", lambda: sync_slow("a")))
        )
        leader.start()
        time.sleep(0.6)
        results.append(b.sync.get_cached("report2", lambda: sync_slow("b")))
        leader.join(5)
        assert sorted(results) == ["sync a", "sync a"] and loads == ["a", "a"]
    finally:
        a.sync.clear()
        a.sync.close()
        b.sync.close()
