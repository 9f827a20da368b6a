"""RedisTier under pressure: the FIFO pool, a burst of misses, foreign Redis types, round trips."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.redis_servers import CommandMonitor, RedisClusterProcesses, RedisServer, purge_prefix
from tiercache import EventKind, TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier, _async_pool_class

pytestmark = pytest.mark.redis


# --- the pool ------------------------------------------------------------------------------------


def _pool(url: str, size: int, wait: float = 5.0) -> Any:
    pool = _async_pool_class().from_url(url, max_connections=size, protocol=2)
    pool.wait_timeout = wait
    return pool


def test_pool_serves_waiters_in_order_and_newcomers_queue_behind(shared_redis_url: str) -> None:
    async def main() -> list[str]:
        pool = _pool(shared_redis_url, 2)
        order: list[str] = []
        a, b = await pool.get_connection(), await pool.get_connection()

        async def waiter(name: str) -> None:
            conn = await pool.get_connection()
            order.append(name)
            await asyncio.sleep(0)
            await pool.release(conn)

        tasks = [asyncio.create_task(waiter(f"w{i}")) for i in range(5)]
        await asyncio.sleep(0.01)  # all five are queued
        await pool.release(a)  # w0 gets it, and a newcomer arriving now must queue behind w1..w4
        late = asyncio.create_task(waiter("late"))
        await asyncio.sleep(0.01)
        await pool.release(b)
        await asyncio.gather(*tasks, late)
        assert len(pool._available_connections) == 2 and not pool._in_use_connections
        await pool.disconnect()
        return order

    assert asyncio.run(main()) == ["w0", "w1", "w2", "w3", "w4", "late"]


def test_pool_wakes_one_waiter_per_release_and_runs_no_task_per_wait(shared_redis_url: str) -> None:
    async def main() -> None:
        pool = _pool(shared_redis_url, 2)
        held = [await pool.get_connection(), await pool.get_connection()]
        got: list[int] = []

        async def waiter(i: int) -> None:
            got.append(i)
            conn = await pool.get_connection()
            got.append(-i)
            await pool.release(conn)

        tasks_before = len(asyncio.all_tasks())
        tasks = [asyncio.create_task(waiter(i)) for i in range(1, 101)]
        await asyncio.sleep(0.01)
        assert len(asyncio.all_tasks()) == tasks_before + 100  # no helper task per wait
        assert len(pool._waiters) == 100
        got.clear()
        await pool.release(held.pop())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        # One release: one waiter served (and it released in turn, serving the next one): the
        # others never woke (they would have appended nothing anyway, but they are still queued).
        assert got[:1] == [-1]
        await pool.release(held.pop())
        await asyncio.gather(*tasks)
        assert sorted(-g for g in got if g < 0) == list(range(1, 101))
        await pool.disconnect()

    asyncio.run(main())


def test_pool_timeout_and_cancelled_waiter_leave_the_queue(shared_redis_url: str) -> None:
    async def main() -> None:
        pool = _pool(shared_redis_url, 2, wait=0.05)
        a, b = await pool.get_connection(), await pool.get_connection()
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError, match="pool timeout"):
            await pool.get_connection()
        assert 0.04 < time.monotonic() - started < 1.0
        assert not pool._waiters
        pool.wait_timeout = 5
        doomed = asyncio.create_task(pool.get_connection())
        survivor = asyncio.create_task(pool.get_connection())
        await asyncio.sleep(0.01)
        await pool.release(a)  # handed to `doomed`...
        doomed.cancel()  # ...which is cancelled before it resumes: the connection moves on
        with pytest.raises(asyncio.CancelledError):
            await doomed
        conn = await asyncio.wait_for(survivor, 1)
        assert conn is a
        await pool.release(conn)
        await pool.release(b)
        assert len(pool._available_connections) == 2 and not pool._in_use_connections
        await pool.disconnect()

    asyncio.run(main())


# --- the burst -----------------------------------------------------------------------------------


def test_a_burst_of_misses_with_default_settings_stores_everything(redis_server: RedisServer) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import burst
    finally:
        sys.path.pop(0)
    result = burst.run(redis_server.url, rounds=2, burst=1000, load_s=0.001)
    assert result["loaded"] == 2000
    assert result["stored"] == 2000
    assert result["tier_errors"] == 0
    assert result["breaker_opened"] == 0


# --- foreign Redis types under a cache key ---------------------------------------------------------

FOREIGN = {
    "hash": lambda r, k: r.hset(k, "f", "v"),
    "list": lambda r, k: r.rpush(k, "v"),
    "set": lambda r, k: r.sadd(k, "v"),
    "zset": lambda r, k: r.zadd(k, {"v": 1}),
    "stream": lambda r, k: r.xadd(k, {"f": "v"}),
}


@pytest.fixture
def raw(shared_redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(shared_redis_url)
    yield client
    client.close()


def _cache(url: str, prefix: str) -> tuple[TieredCache, RedisTier]:
    tier = RedisTier(url=url, prefix=prefix)
    return TieredCache([MemoryTier(), tier], ttl=60, namespace="ft"), tier


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_foreign_type_is_a_counted_corrupt_miss_on_every_read_path_and_is_replaced(
    kind: str, shared_redis_url: str, redis_prefix: str, raw: redis.Redis
) -> None:
    cache, tier = _cache(shared_redis_url, redis_prefix)
    name = tier._vkey("ft:k")
    red = cache.stats.tiers[1]
    try:
        FOREIGN[kind](raw, name)
        # GET (sync, async) and MGET (get_many): a miss, counted once per read, no tier error
        assert cache.sync.get("k") is None
        assert red.corrupt == 1
        assert asyncio.run(cache.get("k")) is None
        assert red.corrupt == 2

        async def batched() -> list[Any]:  # the 2nd and 3rd reads are coalesced into one MGET
            return await asyncio.gather(cache.get("a"), cache.get("k"), cache.get("b"))

        assert asyncio.run(batched()) == [None, None, None]
        assert red.corrupt == 3
        assert red.errors == 0 and red.breaker_opened == 0 and red.skipped == 0
        # delete removes it
        cache.sync.delete("k")
        assert raw.type(name) in (b"string", b"none")
        # a miss through get_cached: counted once (the leader's re-read under the lease is not
        # counted again), and the loaded value replaces the foreign key (sync, then async)
        raw.delete(name)
        FOREIGN[kind](raw, name)
        assert cache.sync.get_cached("k", lambda: "fresh") == "fresh"
        assert red.corrupt == 4
        assert raw.type(name) == b"string"
        raw.delete(name)
        FOREIGN[kind](raw, name)
        cache.sync.close()
        cache, tier = _cache(shared_redis_url, redis_prefix)  # a new L1, so the miss reaches Redis
        red = cache.stats.tiers[1]
        assert asyncio.run(cache.get_cached("k", _fresh)) == "fresh"
        assert red.corrupt == 1
        assert raw.type(name) == b"string"
        assert red.errors == 0 and red.breaker_opened == 0 and red.skipped == 0
    finally:
        raw.delete(name)
        cache.sync.close()
        purge_prefix(shared_redis_url, redis_prefix)


async def _fresh() -> str:
    return "fresh"


def test_batch_read_of_foreign_keys_counts_each_once(
    shared_redis_url: str, redis_prefix: str, raw: redis.Redis
) -> None:
    cache, tier = _cache(shared_redis_url, redis_prefix)
    try:
        cache.sync.set("s", "string value")
        raw.hset(tier._vkey("ft:h"), "f", "v")
        raw.rpush(tier._vkey("ft:l"), "v")
        events: list[str] = []
        tier.bind(tier_binding := _binding(events))
        del tier_binding
        assert tier.get_many(["ft:s", "ft:h", "ft:l", "ft:absent"])[1:] == [None, None, None]
        assert events == ["ft:h", "ft:l"]
        events.clear()

        async def both() -> list[Any]:
            return await tier.aget_many(["ft:h", "ft:absent", "ft:l"])

        assert asyncio.run(both()) == [None, None, None]
        assert events == ["ft:h", "ft:l"]
    finally:
        cache.sync.close()
        purge_prefix(shared_redis_url, redis_prefix)


def _binding(events: list[str]) -> Any:
    from tiercache._tier import TierBinding

    def hook(event: Any) -> None:
        if event.kind == EventKind.CORRUPT:
            events.append(event.key)

    return TierBinding(namespace="ft", on_event=hook)


# --- round trips -----------------------------------------------------------------------------------


def test_a_miss_through_l1_and_l2_costs_three_round_trips(redis_server: RedisServer) -> None:
    tier = RedisTier(url=redis_server.url, prefix="rt")
    cache = TieredCache([MemoryTier(), tier], ttl=60, namespace="rt")
    try:
        cache.sync.get_cached("warm", lambda: 0)  # connections up, scripts sent in full once
        asyncio.run(cache.get_cached("warm-async", _fresh))
        monitor = CommandMonitor(redis_server.port)
        assert cache.sync.get_cached("one", lambda: 1) == 1
        monitor.stop()
        assert monitor.client_commands() == ["GET", "EVALSHA", "EVALSHA"]

        async def one() -> Any:
            return await cache.get_cached("two", _fresh)

        monitor = CommandMonitor(redis_server.port)
        assert asyncio.run(one()) == "fresh"
        monitor.stop()
        assert monitor.client_commands() == ["GET", "EVALSHA", "EVALSHA"]
        assert redis.Redis.from_url(redis_server.url).exists(tier._vkey("rt:two") + ":lease") == 0
    finally:
        cache.sync.close()


def test_a_congested_event_loop_does_not_turn_answers_into_timeouts(
    shared_redis_url: str, redis_prefix: str
) -> None:
    """The loop is blocked 4x longer than socket_timeout while the reply sits in the socket: the
    read still succeeds (the timer sees the reply's bytes buffered, or that it ran late)."""
    tier = RedisTier(url=shared_redis_url, prefix=redis_prefix, socket_timeout=0.05, connect_timeout=0.05)
    cache = TieredCache([tier], namespace="lag")

    async def main() -> None:
        await cache.set("k", 1)
        for _ in range(3):
            reader = asyncio.create_task(cache.get("k"))
            await asyncio.sleep(0)  # the GET is sent
            time.sleep(0.2)  # noqa: ASYNC251 -- the loop is stuck (a thousand tasks' work, a GC pause)
            assert await reader == 1
        await cache.aclose()

    try:
        asyncio.run(main())
        assert cache.stats.tiers[0].errors == 0
    finally:
        cache.sync.close()
        purge_prefix(shared_redis_url, redis_prefix)


def test_a_miss_on_cluster_costs_three_round_trips(
    redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    tier = RedisTier(url=redis_cluster.url, prefix=redis_prefix)
    cache = TieredCache([MemoryTier(), tier], ttl=60, namespace="rt")
    try:
        # Topology known, and each script cached on every node (one EVAL per node and script
        # the first time: each node has its own script cache).
        for i in range(30):
            cache.sync.get_cached(f"warm{i}", lambda: 0)

        def counted(run: Any) -> list[str]:
            monitors = [CommandMonitor(port) for port in redis_cluster.ports]
            run()
            for m in monitors:
                m.stop()
            return [c for m in monitors for c in m.client_commands()]

        assert counted(lambda: cache.sync.get_cached("one", lambda: 1)) == ["GET", "EVALSHA", "EVALSHA"]

        async def async_miss() -> list[str]:
            for i in range(30):  # this loop's client learns the topology
                await cache.get_cached(f"warm-async{i}", _fresh)
            monitors = [CommandMonitor(port) for port in redis_cluster.ports]
            assert await cache.get_cached("two", _fresh) == "fresh"
            for m in monitors:
                m.stop()
            await tier.aclose()  # this loop's clients; the cache stays open
            return [c for m in monitors for c in m.client_commands()]

        assert asyncio.run(async_miss()) == ["GET", "EVALSHA", "EVALSHA"]
    finally:
        cache.sync.close()
        purge_prefix(redis_cluster.url, redis_prefix)


def test_garbage_bytes_are_counted_once_per_miss(
    shared_redis_url: str, redis_prefix: str, raw: redis.Redis
) -> None:
    cache, tier = _cache(shared_redis_url, redis_prefix)
    try:
        raw.set(tier._vkey("ft:g"), b"not a record at all")
        assert cache.sync.get_cached("g", lambda: 1) == 1  # first read + the leader's re-read
        assert cache.stats.tiers[1].corrupt == 1
        raw.set(tier._vkey("ft:h"), b"tc1v00000000000000000001{broken")
        assert asyncio.run(cache.get_cached("h", _fresh)) == "fresh"
        assert cache.stats.tiers[1].corrupt == 2
        assert cache.stats.tiers[1].errors == 0
    finally:
        cache.sync.close()
        purge_prefix(shared_redis_url, redis_prefix)


def test_a_burst_of_misses_on_cluster_queues_per_node(
    redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    """redis-py's async Cluster client fails a command when a node's pool is exhausted; the tier
    queues per node instead, so 1,000 concurrent misses are all stored, with no tier error."""
    tier = RedisTier(url=redis_cluster.url, prefix=redis_prefix)
    cache = TieredCache([MemoryTier(), tier], ttl=60, namespace="cb")

    async def loader(i: int) -> int:
        await asyncio.sleep(0.001)
        return i

    async def main() -> list[Any]:
        got = await asyncio.gather(*(cache.get_cached(f"k{i}", lambda i=i: loader(i)) for i in range(1000)))
        await cache.aclose()
        return got

    try:
        assert asyncio.run(main()) == list(range(1000))
        red = cache.stats.tiers[1]
        assert (red.errors, red.breaker_opened) == (0, 0), cache.stats.snapshot()
        stored = [tier.get(f"cb:k{i}") for i in range(1000)]
        assert all(e is not None and e.value == i for i, e in enumerate(stored))
    finally:
        cache.sync.close()
        purge_prefix(redis_cluster.url, redis_prefix)
