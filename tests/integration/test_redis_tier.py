"""RedisTier on real servers: lease, wake-ups, round trips, corruption, event loops, faults."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from tests.redis_servers import (
    RedisClusterProcesses,
    RedisSentinelProcess,
    RedisServer,
    TcpProxy,
    command,
    purge_prefix,
    running_server,
)
from tiercache._entry import Entry, next_version
from tiercache._events import Event, EventKind
from tiercache._serde import JsonCodec
from tiercache._tier import TierBinding
from tiercache.adapters.redis import RedisTier
from tiercache.testing import FakeClock, make_entry

pytestmark = pytest.mark.redis

DATA_COMMANDS = ("get", "mget", "set", "evalsha", "eval", "publish", "subscribe", "unsubscribe", "pttl")


def data_calls(stats: dict[str, int]) -> dict[str, int]:
    """The commandstats entries that are cache traffic (not INFO/CONFIG issued by the test itself)."""
    return {k: v for k, v in stats.items() if k in DATA_COMMANDS}


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def bound(tier: RedisTier, clock: Any = None, hook: Any = None) -> RedisTier:
    tier.bind(
        TierBinding(
            clock=clock or time.time,
            codec=JsonCodec(),
            namespace="it",
            on_event=hook or (lambda e: None),
        )
    )
    return tier


@pytest.fixture
def shared_tier(shared_redis_url: str, redis_prefix: str) -> Iterator[RedisTier]:
    tier = bound(RedisTier(url=shared_redis_url, prefix=redis_prefix))
    yield tier
    tier.close()
    purge_prefix(shared_redis_url, redis_prefix)


@pytest.fixture
def own_tier(redis_server: RedisServer) -> Iterator[RedisTier]:
    tier = bound(RedisTier(url=redis_server.url))
    yield tier
    tier.close()


# --- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["app:user:42", "a}b", "}", "{x}", "x{y}z", "}{", "k" * 300, "é" * 200 + "}", "app:{user}:1"],
)
def test_value_and_lease_keys_share_a_cluster_slot(key: str) -> None:
    tier = RedisTier(url="redis://127.0.0.1:1/0")
    vkey = tier._vkey(key)
    assert key_slot(vkey.encode()) == key_slot((vkey + ":lease").encode())
    assert len(vkey.encode()) <= 256 + len("tc:{}")
    assert tier._vkey(key) == vkey  # stable


def test_distinct_keys_get_distinct_names() -> None:
    tier = RedisTier(url="redis://127.0.0.1:1/0")
    keys = ["a}b", "a}c", "k" * 300, "k" * 299 + "j", "x", "x:"]
    assert len({tier._vkey(k) for k in keys}) == len(keys)


def test_secrets_stay_out_of_repr_and_errors() -> None:
    tier = bound(RedisTier(url="redis://user:s3cr3t-pw@127.0.0.1:1/0"))
    assert "s3cr3t-pw" not in repr(tier)
    assert "***" in repr(tier)
    with pytest.raises(redis.ConnectionError) as info:
        tier.get("k")
    assert "s3cr3t-pw" not in str(info.value)
    tier.close()


def test_missing_redis_package_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r"pip install .tiercache-py\[redis\]."):
        RedisTier(url="redis://127.0.0.1:1/0")


# --- stored format and TTL -----------------------------------------------------------------------


def test_record_layout_and_physical_ttl(shared_tier: RedisTier, shared_redis_url: str) -> None:
    raw = redis.Redis.from_url(shared_redis_url)
    now = time.time()
    entry = make_entry("app:k", {"x": 1}, now, ttl=2, stale_ttl=1, version=123)
    shared_tier.set("app:k", entry)
    vkey = shared_tier._vkey("app:k")
    data = raw.get(vkey)
    assert isinstance(data, bytes)
    assert data[:24] == b"tc1v" + b"%020d" % 123
    assert JsonCodec().loads(data[24:]) == entry
    assert 2900 <= raw.pttl(vkey) <= 3000  # stale_until - now, in ms: no default TTL
    assert entry.payload == data[24:]  # encoded once, kept on the entry for other tiers
    raw.close()


def test_max_ttl_clamps_physical_ttl_and_stored_times(shared_redis_url: str, redis_prefix: str) -> None:
    tier = bound(RedisTier(url=shared_redis_url, prefix=redis_prefix, max_ttl=1.5))
    raw = redis.Redis.from_url(shared_redis_url)
    try:
        entry = make_entry("app:m", "v", time.time(), ttl=600)
        entry.payload = JsonCodec().dumps(entry)  # a payload encoded before clamping is not reused
        tier.set("app:m", entry)
        assert 1400 <= raw.pttl(tier._vkey("app:m")) <= 1500
        got = tier.get("app:m")
        assert got is not None and got.stale_until <= time.time() + 1.5
    finally:
        tier.close()
        raw.close()
        purge_prefix(shared_redis_url, redis_prefix)


def test_tombstone_expires(shared_redis_url: str, redis_prefix: str) -> None:
    tier = bound(RedisTier(url=shared_redis_url, prefix=redis_prefix, tombstone_ttl=0.2))
    try:
        late = make_entry("app:t", "late", time.time())
        tier.delete("app:t", next_version())
        tier.set("app:t", late)
        assert tier.get("app:t") is None  # refused by the tombstone
        time.sleep(0.3)
        tier.set("app:t", late)
        got = tier.get("app:t")
        assert got is not None and got.value == "late"
    finally:
        tier.close()
        purge_prefix(shared_redis_url, redis_prefix)


# --- corruption ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_value",
    [
        b"hello",  # someone else's plain string
        b"tc1v" + b"%020d" % 7 + b"{not json",
        b"tc1v" + b"x" * 20 + b"{}",  # header with a broken version
        b"tc1q" + b"%020d" % 7 + b"{}",  # unknown kind
        b"tc1v" + b"%020d" % 7 + b'{"tc": 99}',  # valid JSON, not an envelope
    ],
)
def test_corrupt_bytes_are_a_miss_and_an_event(
    shared_redis_url: str, redis_prefix: str, raw_value: bytes
) -> None:
    rec = Recorder()
    tier = bound(RedisTier(url=shared_redis_url, prefix=redis_prefix), hook=rec)
    raw = redis.Redis.from_url(shared_redis_url)
    try:
        raw.set(tier._vkey("app:c"), raw_value, px=10_000)
        assert tier.get("app:c") is None
        assert tier.get_many(["app:c"]) == [None]
        assert asyncio.run(tier.aget("app:c")) is None
        assert rec.kinds() == [EventKind.CORRUPT] * 3
        assert all(e.key == "app:c" and e.tier == "redis" for e in rec.events)
        # A newer write replaces foreign bytes; then reads work again.
        tier.set("app:c", make_entry("app:c", 1, time.time()))
        got = tier.get("app:c")
        assert got is not None and got.value == 1
    finally:
        tier.close()
        raw.close()
        purge_prefix(shared_redis_url, redis_prefix)


def test_record_of_another_key_is_a_miss(shared_tier: RedisTier, shared_redis_url: str) -> None:
    rec = Recorder()
    shared_tier.bind(TierBinding(clock=time.time, codec=JsonCodec(), on_event=rec))
    raw = redis.Redis.from_url(shared_redis_url)
    shared_tier.set("app:a", make_entry("app:a", "A", time.time()))
    raw.set(shared_tier._vkey("app:b"), raw.get(shared_tier._vkey("app:a")) or b"", px=10_000)
    assert shared_tier.get("app:b") is None
    assert rec.kinds() == [EventKind.CORRUPT]
    raw.close()


# --- round trips ---------------------------------------------------------------------------------


def test_get_many_is_one_mget_and_set_many_one_pipeline(
    own_tier: RedisTier, redis_server: RedisServer
) -> None:
    now = time.time()
    entries = [make_entry(f"app:{i}", i, now) for i in range(100)]
    own_tier.set_many([(e.key, e) for e in entries])  # also loads the script (NOSCRIPT fallback)
    own_tier.set_many([(e.key, e) for e in entries])
    redis_server.reset_stats()
    got = own_tier.get_many([e.key for e in entries])
    assert [g.value if g else None for g in got] == list(range(100))
    assert data_calls(redis_server.commandstats()) == {"mget": 1}
    redis_server.reset_stats()
    own_tier.set_many([(e.key, e) for e in entries])
    stats = data_calls(redis_server.commandstats())
    assert stats["evalsha"] == 100 and "eval" not in stats  # one pipeline (SETs counted are the scripts')

    async def scenario() -> None:
        redis_server.reset_stats()
        got = await own_tier.aget_many([e.key for e in entries])
        assert [g.value if g else None for g in got] == list(range(100))
        assert data_calls(redis_server.commandstats()) == {"mget": 1}

    asyncio.run(scenario())


def test_get_many_on_cluster_is_one_mget_per_slot(
    redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    tier = bound(RedisTier(url=redis_cluster.url, prefix=redis_prefix))
    try:
        now = time.time()
        entries = [make_entry(f"app:{i}", i, now) for i in range(50)]
        tier.set_many([(e.key, e) for e in entries])
        slots = {key_slot(tier._vkey(e.key).encode()) for e in entries}
        redis_cluster.reset_stats()
        got = tier.get_many([e.key for e in entries])
        assert [g.value if g else None for g in got] == list(range(50))
        assert data_calls(redis_cluster.commandstats()) == {"mget": len(slots)}
    finally:
        tier.close()
        purge_prefix(redis_cluster.url, redis_prefix)


# --- the lease -----------------------------------------------------------------------------------


def test_only_one_of_many_concurrent_acquirers_gets_the_lease(shared_tier: RedisTier) -> None:
    barrier = threading.Barrier(16)
    tokens: list[str | None] = []

    def grab() -> None:
        barrier.wait()
        tokens.append(shared_tier.acquire_lease("app:l", 5))

    threads = [threading.Thread(target=grab) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [t for t in tokens if t is not None]
    assert len(winners) == 1


def test_release_is_compare_and_delete_and_extend_needs_the_token(shared_tier: RedisTier) -> None:
    token = shared_tier.acquire_lease("app:l", 5)
    assert token is not None
    shared_tier.release_lease("app:l", "not-the-token")
    assert shared_tier.acquire_lease("app:l", 5) is None  # still held
    assert shared_tier.extend_lease("app:l", "not-the-token", 5) is False
    assert shared_tier.extend_lease("app:l", token, 5) is True
    shared_tier.release_lease("app:l", token)
    assert shared_tier.acquire_lease("app:l", 5) is not None


def test_a_crashed_holders_lease_expires(shared_tier: RedisTier) -> None:
    assert shared_tier.acquire_lease("app:crash", 0.15) is not None  # then "crash": never release
    assert shared_tier.acquire_lease("app:crash", 0.15) is None
    time.sleep(0.2)
    assert shared_tier.acquire_lease("app:crash", 0.15) is not None


def test_async_lease_roundtrip(shared_tier: RedisTier) -> None:
    async def scenario() -> None:
        token = await shared_tier.aacquire_lease("app:al", 5)
        assert token is not None
        assert await shared_tier.aacquire_lease("app:al", 5) is None
        assert await shared_tier.aextend_lease("app:al", token, 5)
        await shared_tier.arelease_lease("app:al", token)
        assert await shared_tier.aacquire_lease("app:al", 5) is not None

    asyncio.run(scenario())


def test_async_waiter_is_woken_by_the_write_without_polling(redis_server: RedisServer) -> None:
    leader = bound(RedisTier(url=redis_server.url))
    waiter = bound(RedisTier(url=redis_server.url))
    try:
        token = leader.acquire_lease("app:w", 10)
        assert token is not None
        entry = make_entry("app:w", "loaded", time.time())
        written_at: list[float] = []

        def lead() -> None:
            time.sleep(0.4)
            leader.set("app:w", entry)
            written_at.append(time.monotonic())
            leader.release_lease("app:w", token)

        async def wait() -> tuple[Entry | None, float]:
            got = await waiter.await_for_entry("app:w", 5.0)
            return got, time.monotonic()

        redis_server.reset_stats()
        thread = threading.Thread(target=lead)
        thread.start()
        got, returned_at = asyncio.run(wait())
        thread.join()
        assert got is not None and got.value == "loaded"
        assert returned_at - written_at[0] < 0.05  # woken by the message, not by a poll
        stats = data_calls(redis_server.commandstats())
        # leader: 1 set script + 1 release script. waiter: SUBSCRIBE once, a peek before waiting and
        # one after the wake. A 10 ms poll over 0.4 s would have made ~10 more.
        assert stats.get("subscribe") == 1
        assert stats["evalsha"] <= 2 + 3, stats
    finally:
        leader.close()
        waiter.close()


def test_sync_waiters_are_woken_by_the_write(redis_server: RedisServer) -> None:
    leader = bound(RedisTier(url=redis_server.url))
    waiter = bound(RedisTier(url=redis_server.url))
    try:
        token = leader.acquire_lease("app:s", 10)
        assert token is not None
        results: list[tuple[Entry | None, float]] = []

        def wait() -> None:
            got = waiter.wait_for_entry("app:s", 5.0)
            results.append((got, time.monotonic()))

        redis_server.reset_stats()
        threads = [threading.Thread(target=wait) for _ in range(5)]
        for t in threads:
            t.start()
        time.sleep(0.4)
        leader.set("app:s", make_entry("app:s", "v", time.time()))
        written = time.monotonic()
        for t in threads:
            t.join()
        leader.release_lease("app:s", token)
        assert [r[0].value if r[0] else None for r in results] == ["v"] * 5
        assert all(at - written < 0.05 for _, at in results)
        stats = data_calls(redis_server.commandstats())
        assert stats.get("subscribe") == 1  # one subscriber connection shared by all five waiters
        assert stats["evalsha"] <= 1 + 5 * 3, stats
    finally:
        leader.close()
        waiter.close()


def test_waiter_notices_a_crashed_leader_when_its_lease_expires(redis_server: RedisServer) -> None:
    leader = bound(RedisTier(url=redis_server.url))
    waiter = bound(RedisTier(url=redis_server.url))
    try:
        assert leader.acquire_lease("app:gone", 0.3) is not None  # the leader then dies silently
        started = time.monotonic()
        redis_server.reset_stats()
        got = asyncio.run(waiter.await_for_entry("app:gone", 5.0))
        elapsed = time.monotonic() - started
        assert got is None
        assert 0.25 <= elapsed < 0.6  # at the lease's expiry, long before the 5 s deadline
        assert data_calls(redis_server.commandstats())["evalsha"] <= 3
    finally:
        leader.close()
        waiter.close()


def test_waiter_returns_at_once_when_nobody_holds_the_lease(shared_tier: RedisTier) -> None:
    started = time.monotonic()
    assert shared_tier.wait_for_entry("app:nobody", 5.0) is None
    assert time.monotonic() - started < 0.5


def test_waiter_deadline_is_kept(shared_tier: RedisTier) -> None:
    assert shared_tier.acquire_lease("app:slow", 10) is not None
    started = time.monotonic()
    assert asyncio.run(shared_tier.await_for_entry("app:slow", 0.3)) is None
    assert 0.28 <= time.monotonic() - started < 0.6


def test_waiter_polls_with_backoff_when_the_subscriber_cannot_connect(shared_tier: RedisTier) -> None:
    clock = FakeClock()
    shared_tier.bind(TierBinding(clock=clock, codec=JsonCodec()))

    async def scenario() -> Entry | None:
        state = shared_tier._state()
        # A subscriber that never becomes ready (as when its connection is refused).
        state.subscriber = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
        token = await shared_tier.aacquire_lease("app:poll", 10)
        assert token is not None

        async def write_later() -> None:
            await asyncio.sleep(0.25)
            await shared_tier.aset("app:poll", make_entry("app:poll", "p", clock()))

        task = asyncio.create_task(write_later())
        got = await shared_tier.await_for_entry("app:poll", 2.0)
        await task
        state.subscriber = None
        return got

    started = time.monotonic()
    got = asyncio.run(scenario())
    assert got is not None and got.value == "p"
    assert time.monotonic() - started < 0.5  # found by a poll of at most 100 ms after the write


# --- event loops ---------------------------------------------------------------------------------


def test_asyncio_run_three_times_with_one_tier_closes_old_clients(redis_server: RedisServer) -> None:
    tier = bound(RedisTier(url=redis_server.url))
    raw = redis.Redis(port=redis_server.port)
    try:
        entry = make_entry("app:loop", "x", time.time())

        async def invocation(i: int) -> Any:
            if i == 0:
                await tier.aset("app:loop", entry)
            got = await tier.aget("app:loop")
            many = await tier.aget_many(["app:loop", "app:none"])
            waited = await tier.await_for_entry("app:loop", 1.0)  # starts this loop's subscriber
            return got.value if got else None, [m.value if m else None for m in many], waited

        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            for i in range(3):
                assert asyncio.run(invocation(i)) == ("x", ["x", None], entry)
            gc.collect()
        # Each finished loop's keeper closed its client and subscriber: only our raw client is left.
        clients = raw.client_list()
        assert len(clients) == 1, clients
    finally:
        tier.close()
        raw.close()


# --- faults --------------------------------------------------------------------------------------


def test_killed_server_fails_fast_and_restart_recovers(redis_server: RedisServer) -> None:
    tier = bound(RedisTier(url=redis_server.url))
    try:
        entry = make_entry("app:f", "v", time.time())
        tier.set("app:f", entry)
        assert tier.get("app:f") is not None
        redis_server.kill()
        durations = []
        for _ in range(5):
            started = time.perf_counter()
            with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
                tier.get("app:f")
            durations.append(time.perf_counter() - started)

        async def async_calls() -> list[float]:
            out = []
            for _ in range(5):
                started = time.perf_counter()
                with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
                    await tier.aget("app:f")
                out.append(time.perf_counter() - started)
            return out

        durations += asyncio.run(async_calls())
        assert max(durations) < 0.15, durations  # refused at once; never the 5 s x 10 retries default
        redis_server.start()
        tier.set("app:f", entry)  # the server came back empty
        got = tier.get("app:f")
        assert got is not None and got.value == "v"
        assert asyncio.run(tier.aget("app:f")) is not None
    finally:
        tier.close()


def test_stalled_connection_is_bounded_by_the_socket_timeout(redis_server: RedisServer) -> None:
    proxy = TcpProxy(redis_server.port)
    tier = bound(RedisTier(url=proxy.url, socket_timeout=0.05, connect_timeout=0.1))
    try:
        entry = make_entry("app:p", "v", time.time())
        tier.set("app:p", entry)
        assert tier.get("app:p") is not None
        proxy.stall()
        durations = []
        for op in (
            lambda: tier.get("app:p"),
            lambda: tier.set("app:p", entry),
            lambda: tier.get_many(["app:p"]),
        ):
            started = time.perf_counter()
            with pytest.raises(redis.TimeoutError):
                op()
            durations.append(time.perf_counter() - started)

        async def async_get() -> float:
            started = time.perf_counter()
            with pytest.raises(redis.TimeoutError):
                await tier.aget("app:p")
            return time.perf_counter() - started

        durations.append(asyncio.run(async_get()))
        assert max(durations) < 0.2, durations  # 50 ms socket timeout, no retries
        proxy.reset()  # drop the hung connections; new ones pass through again
        got = tier.get("app:p")
        assert got is not None and got.value == "v"
    finally:
        tier.close()
        proxy.close()


def test_a_cancelled_read_never_leaves_its_reply_for_the_next_one(redis_server: RedisServer) -> None:
    """A pooled connection: a read cancelled while its GET is on the wire must drop the
    connection, or the next read on it would be handed the first key's reply."""
    proxy = TcpProxy(redis_server.port)
    tier = bound(RedisTier(url=proxy.url, max_connections=2, socket_timeout=5, connect_timeout=1))
    try:
        tier.set("app:one", make_entry("app:one", "one", time.time()))
        tier.set("app:two", make_entry("app:two", "two", time.time()))

        async def scenario() -> Any:
            assert (await tier.aget("app:one")) is not None  # the pool's one connection is open
            proxy.stall()
            first = asyncio.ensure_future(tier.aget("app:one"))
            await asyncio.sleep(0.1)  # the GET is written; its reply is held by the proxy
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            proxy.passthrough()
            return await tier.aget("app:two")

        got = asyncio.run(scenario())
        assert got is not None and (got.key, got.value) == ("app:two", "two")
    finally:
        tier.close()
        proxy.close()


def test_the_lean_pool_reconnects_dropped_connections_and_ignores_a_second_release(
    redis_server: RedisServer,
) -> None:
    from tiercache.adapters.redis import _async_pool_class

    async def scenario() -> None:
        pool = _async_pool_class().from_url(redis_server.url, max_connections=2)
        conn = await pool.get_connection()
        await conn.send_command("PING")
        assert await conn.read_response() in (b"PONG", "PONG")
        await pool.release(conn)
        await pool.release(conn)  # a second release must not list it twice
        first, second = await pool.get_connection(), await pool.get_connection()
        assert first is not second  # two connections, not one handed out twice
        await first.disconnect()  # as after a failed command
        await pool.release(second)
        await pool.release(first)  # released last: handed out next
        again = await pool.get_connection()
        assert again is first and again.is_connected  # reconnected on checkout
        await pool.release(again)
        await pool.disconnect()

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["client kill", "idle timeout"])
def test_connections_the_server_closed_while_idle_are_replaced_not_failed(how: str) -> None:
    """A restart, CLIENT KILL or the server's idle timeout closes pooled connections; the next
    burst of reads and writes must reconnect them, not fail (the tier never retries)."""
    with running_server() as server:
        events: list[Event] = []
        tier = bound(RedisTier(url=server.url, max_connections=8, socket_timeout=1), hook=events.append)
        try:
            for i in range(8):
                tier.set(f"app:idle{i}", make_entry(f"app:idle{i}", i, time.time()))

            async def burst() -> list[Any]:
                return await asyncio.gather(*(tier.aget(f"app:idle{i}") for i in range(8)))

            async def scenario() -> list[Any]:
                assert all(e is not None for e in await burst())  # eight pooled connections
                if how == "client kill":
                    command(server.port, "CLIENT", "KILL", "TYPE", "normal")
                    await asyncio.sleep(0.1)  # idle in the pool while the loop reads the FIN
                else:
                    command(server.port, "CONFIG", "SET", "timeout", "1")
                    await asyncio.sleep(2.5)  # the server's idle check closes them
                return await burst()

            got = asyncio.run(scenario())
            assert [e.value for e in got] == list(range(8))
        finally:
            tier.close()


def test_async_pool_is_bounded_and_callers_wait_for_a_free_connection(redis_server: RedisServer) -> None:
    tier = bound(RedisTier(url=redis_server.url, max_connections=2, socket_timeout=0.5, connect_timeout=0.5))
    raw = redis.Redis(port=redis_server.port)
    try:
        tier.set("app:pool", make_entry("app:pool", "v", time.time()))

        async def scenario() -> tuple[list[Any], int]:
            got = await asyncio.gather(*(tier.aget("app:pool") for _ in range(50)))
            return [g.value if g else None for g in got], len(raw.client_list())

        values, clients = asyncio.run(scenario())
        assert values == ["v"] * 50  # nobody failed with "too many connections"
        assert clients <= 1 + 1 + 2  # raw + the sync client + at most two async connections
    finally:
        tier.close()
        raw.close()


def test_sentinel_constructor_finds_the_master(redis_server: RedisServer) -> None:
    sentinel = RedisSentinelProcess(redis_server.port).start()
    tier = bound(RedisTier(sentinels=[("127.0.0.1", sentinel.port)], service_name=sentinel.service))
    try:
        entry = make_entry("app:sentinel", "via-sentinel", time.time())
        tier.set("app:sentinel", entry)
        got = asyncio.run(tier.aget("app:sentinel"))
        assert got is not None and got.value == "via-sentinel"
        raw = redis.Redis(port=redis_server.port)
        assert raw.exists(tier._vkey("app:sentinel")) == 1  # it really went to the monitored master
        raw.close()
        token = tier.acquire_lease("app:sentinel:l", 5)
        assert token is not None
        tier.release_lease("app:sentinel:l", token)
    finally:
        tier.close()
        sentinel.cleanup()


def _until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sentinel_failover_moves_the_tier_to_the_promoted_replica() -> None:
    """A real failover (SENTINEL FAILOVER): after a bounded number of failed calls (never an
    exception through the cache; here at the tier they are counted), reads and writes reach the
    promoted replica, and what was written before the failover is still there."""
    master = RedisServer().start()
    replica = RedisServer(extra=["--replicaof", "127.0.0.1", str(master.port)]).start()
    sentinel = RedisSentinelProcess(master.port).start()
    tier = bound(
        RedisTier(
            sentinels=[("127.0.0.1", sentinel.port)],
            service_name=sentinel.service,
            socket_timeout=0.5,
            connect_timeout=0.5,
        )
    )
    try:
        _until(lambda: "master_link_status:up" in command(replica.port, "INFO", "replication"), 10, "sync")
        _until(
            lambda: str(replica.port) in command(sentinel.port, "SENTINEL", "REPLICAS", sentinel.service),
            15,
            "the sentinel to know the replica",
        )
        tier.set("app:before", make_entry("app:before", "before", time.time()))
        _until(
            lambda: command(replica.port, "EXISTS", tier._vkey("app:before")).strip() == "1", 5, "replication"
        )
        assert command(sentinel.port, "SENTINEL", "FAILOVER", sentinel.service).strip() == "OK"
        _until(
            lambda: (
                str(replica.port)
                in command(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", sentinel.service)
            ),
            20,
            "the promotion",
        )
        # Until Sentinel has turned the old master into a replica it still takes writes, and the
        # resync then drops them: Redis's own failover window, not something a client can close.
        _until(lambda: "role:slave" in command(master.port, "INFO", "replication"), 20, "the demotion")
        failures = 0

        def write_and_read() -> bool:
            nonlocal failures
            try:
                tier.set("app:after", make_entry("app:after", "after", time.time()))
                got = tier.get("app:after")
            except Exception:  # the old master refuses writes (READONLY) or drops connections
                failures += 1
                return False
            return got is not None and got.value == "after"

        _until(write_and_read, 15, "the tier to write to the new master")
        assert command(replica.port, "EXISTS", tier._vkey("app:after")).strip() == "1"  # the promoted one
        before = asyncio.run(tier.aget("app:before"))
        assert before is not None and before.value == "before"
        print(f"\nsentinel failover: {failures} failed call(s) before the tier followed the promotion")
    finally:
        tier.close()
        sentinel.cleanup()
        replica.cleanup()
        master.cleanup()


def test_cluster_waiter_is_woken_by_the_write(
    redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    leader = bound(RedisTier(url=redis_cluster.url, prefix=redis_prefix))
    waiter = bound(RedisTier(url=redis_cluster.url, prefix=redis_prefix))
    try:
        token = leader.acquire_lease("app:cw", 10)
        assert token is not None
        written_at: list[float] = []

        def lead() -> None:
            time.sleep(0.3)
            leader.set("app:cw", make_entry("app:cw", "cluster", time.time()))
            written_at.append(time.monotonic())
            leader.release_lease("app:cw", token)

        thread = threading.Thread(target=lead)
        thread.start()
        got = asyncio.run(waiter.await_for_entry("app:cw", 5.0))
        returned_at = time.monotonic()
        thread.join()
        assert got is not None and got.value == "cluster"
        assert returned_at - written_at[0] < 0.05  # the PUBLISH from the script reached our node
    finally:
        leader.close()
        waiter.close()
        purge_prefix(redis_cluster.url, redis_prefix)
