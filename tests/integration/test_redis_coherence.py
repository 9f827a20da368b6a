"""RedisTier's coherence capabilities (expire, clear, tag times) and RedisBus, on real servers."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.redis_servers import CommandMonitor, RedisClusterProcesses, RedisServer, TcpProxy, purge_prefix
from tiercache._entry import Entry, next_version
from tiercache._serde import JsonCodec
from tiercache._tier import ExpiringTier, NamespaceClearingTier, TagStore, TierBinding
from tiercache.adapters.redis import RedisBus, RedisTier
from tiercache.testing import make_entry

pytestmark = pytest.mark.redis


def bound(tier: RedisTier, namespace: str = "ns") -> RedisTier:
    tier.bind(TierBinding(clock=time.time, codec=JsonCodec(), namespace=namespace))
    return tier


@pytest.fixture
def tier(shared_redis_url: str, redis_prefix: str) -> Iterator[RedisTier]:
    t = bound(RedisTier(url=shared_redis_url, prefix=redis_prefix))
    yield t
    t.close()
    purge_prefix(shared_redis_url, redis_prefix)


def raw_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, protocol=2)


def test_redis_tier_offers_the_coherence_capabilities(tier: RedisTier) -> None:
    assert isinstance(tier, ExpiringTier)
    assert isinstance(tier, NamespaceClearingTier)
    assert isinstance(tier, TagStore)


# --- expire ---------------------------------------------------------------------------------------


def test_expire_lowers_fresh_until_and_keeps_value_stale_until_and_ttl(
    tier: RedisTier, shared_redis_url: str
) -> None:
    r = raw_client(shared_redis_url)
    now = time.time()
    entry = make_entry("ns:a", {"x": 1.1}, now, ttl=60, stale_ttl=60, tags=("t",))
    tier.set("ns:a", entry)
    vkey = tier._vkey("ns:a")
    pttl_before = r.pttl(vkey)
    version = next_version()
    at = now + 1.234567891
    tier.expire("ns:a", at, version)
    got = tier.get("ns:a")
    assert got is not None
    assert got.fresh_until == at and got.version == version
    assert got.stale_until == entry.stale_until and got.created_at == entry.created_at
    assert got.value == {"x": 1.1} and got.tags == ("t",)
    assert got.payload is None  # the stored envelope carries the old times: never copied on
    assert 0 <= pttl_before - r.pttl(vkey) < 1000  # physical TTL untouched (KEEPTTL)
    stored = r.get(vkey)
    assert isinstance(stored, bytes) and stored[:4] == b"tc1e"
    # A later expiry time does not make it fresher; an earlier one lowers it further.
    tier.expire("ns:a", at + 100, next_version())
    assert tier.get("ns:a").fresh_until == at  # type: ignore[union-attr]
    last = next_version()
    tier.expire("ns:a", at - 1, last)
    got = tier.get("ns:a")
    assert got is not None and got.fresh_until == at - 1 and got.version == last
    # An expiry later than fresh_until changes only the version.
    tier.set("ns:b", make_entry("ns:b", 2, now, ttl=5))
    tier.expire("ns:b", now + 50, next_version())
    assert tier.get("ns:b").fresh_until == pytest.approx(now + 5)  # type: ignore[union-attr]
    r.close()


def test_expire_fences_versions(tier: RedisTier, shared_redis_url: str) -> None:
    now = time.time()
    old_version = next_version()
    entry = make_entry("ns:a", "v", now)
    tier.set("ns:a", entry)
    tier.expire("ns:a", now, old_version)  # older than the stored entry: nothing happens
    assert tier.get("ns:a") == entry
    expire_version = next_version()
    tier.expire("ns:a", now, expire_version)
    late = make_entry("ns:a", "late", now, version=expire_version - 1)
    tier.set("ns:a", late)  # a late write older than the expire cannot bring a fresh copy back
    got = tier.get("ns:a")
    assert got is not None and got.value == "v" and not got.is_fresh(time.time())
    newer = make_entry("ns:a", "newer", time.time())
    tier.set("ns:a", newer)
    assert tier.get("ns:a") == newer
    # Missing keys, tombstones and foreign bytes are left alone.
    tier.expire("ns:missing", now, next_version())
    assert raw_client(shared_redis_url).exists(tier._vkey("ns:missing")) == 0
    tier.delete("ns:a", next_version())
    tombstone = raw_client(shared_redis_url).get(tier._vkey("ns:a"))
    tier.expire("ns:a", now, next_version())
    assert raw_client(shared_redis_url).get(tier._vkey("ns:a")) == tombstone
    raw_client(shared_redis_url).set(tier._vkey("ns:foreign"), b"not ours", ex=60)
    tier.expire("ns:foreign", now, next_version())
    assert raw_client(shared_redis_url).get(tier._vkey("ns:foreign")) == b"not ours"


def test_expire_async_face(tier: RedisTier) -> None:
    now = time.time()
    tier.set("ns:a", make_entry("ns:a", 1, now))

    async def run() -> Entry | None:
        await tier.aexpire("ns:a", now, next_version())
        return await tier.aget("ns:a")

    for _ in range(2):  # two event loops
        got = asyncio.run(run())
        assert got is not None and got.fresh_until == now


def test_expire_is_atomic_under_concurrent_writers(tier: RedisTier) -> None:
    """Writers and expirers race on one key; the survivor is always the newest operation."""
    now = time.time()
    first = make_entry("ns:hot", 0, now, ttl=60, stale_ttl=60)
    tier.set("ns:hot", first)
    sets: dict[int, Entry] = {}
    expires: dict[int, float] = {}
    lock = threading.Lock()
    stop = time.monotonic() + 1.0

    def writer() -> None:
        while time.monotonic() < stop:
            e = make_entry("ns:hot", None, time.time(), ttl=60, stale_ttl=60)
            e = e.replace(value=e.version)
            tier.set("ns:hot", e)
            with lock:
                sets[e.version] = e

    def expirer() -> None:
        while time.monotonic() < stop:
            v, at = next_version(), time.time()
            tier.expire("ns:hot", at, v)
            with lock:
                expires[v] = at

    threads = [threading.Thread(target=writer) for _ in range(3)] + [
        threading.Thread(target=expirer) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(sets) > 50 and len(expires) > 50
    newest = max([*sets, *expires])
    got = tier.get("ns:hot")
    assert got is not None and got.version == newest
    if newest in sets:
        assert got.value == newest and got.fresh_until == sets[newest].fresh_until
    else:
        assert got.fresh_until <= expires[newest]
        assert got.value in sets or got.value == 0  # some write's value, intact
        base = sets.get(got.value, first)
        assert got.stale_until == base.stale_until and got.created_at == base.created_at


# --- clear ----------------------------------------------------------------------------------------


def _populate(tier: RedisTier, client: Any, prefix: str) -> tuple[set[bytes], set[bytes]]:
    """Keys of namespace ``ns`` (to be cleared) and everything else (to be kept)."""
    now = time.time()
    mine = ["ns:a", "ns:b}c", "ns:" + "x" * 600, "ns:{tag}", "ns:*?[x]\\"] + [f"ns:k{i}" for i in range(300)]
    others = ["nsx:a", "ns2:a", "n:a", "nsx:" + "x" * 600, "other:ns:a", "nsb}c"]
    for k in mine + others:
        tier.set(k, make_entry(k, k, now))
    tier.delete("ns:gone", next_version())  # a tombstone: part of the namespace
    tier.expire("ns:a", now, next_version())  # an expired record, too
    mine.append("ns:gone")
    lease = tier.acquire_lease("ns:k1", 30)  # leases are left to expire
    assert lease is not None
    foreign = [
        f"{prefix}:ns:a",  # our prefix, not our layout
        f"{prefix}:tags:{{other}}",
        f"{prefix}-other:{{ns:a}}",
        f"{prefix}x:{{ns:a}}",
        f"{prefix}:{{nsx}}",
    ]
    for k in foreign:
        client.set(k, b"foreign", ex=60)
    tier.set_tag_times(["t"], now)
    return {tier._vkey(k).encode() for k in mine}, {tier._vkey(k).encode() for k in others} | {
        k.encode() for k in foreign
    } | {(tier._vkey("ns:k1") + ":lease").encode(), tier._tags_key.encode()}


def _keys(client: Any, prefix: str) -> set[bytes]:
    return set(client.scan_iter(match=f"{prefix}*", count=1000))


def test_clear_removes_the_namespace_and_nothing_else(tier: RedisTier, shared_redis_url: str) -> None:
    client = raw_client(shared_redis_url)
    prefix = tier.prefix
    mine, kept = _populate(tier, client, prefix)
    assert mine | kept <= _keys(client, prefix)
    assert tier.clear("ns:") == len(mine)
    assert _keys(client, prefix) == kept
    assert tier.get("nsx:a") is not None and tier.get("ns:k7") is None
    assert tier.get_tag_times(["t"])[0] is not None
    with pytest.raises(ValueError):
        tier.clear("")  # never "everything"
    client.close()


def test_aclear_and_a_prefix_too_long_to_stay_readable(shared_redis_url: str, redis_prefix: str) -> None:
    """With max_key_bytes=80 a hashed name keeps only 13 bytes of the key: longer prefixes are
    matched on those bytes and the hashed names are confirmed by reading their entry."""
    t = bound(RedisTier(url=shared_redis_url, prefix=redis_prefix, max_key_bytes=80))
    client = raw_client(shared_redis_url)
    now = time.time()
    long_ns, twin_ns = "namespace-long-1:", "namespace-long-2:"
    mine = [long_ns + "a", long_ns + "y" * 100, long_ns + "}" + "z" * 100]
    kept = [twin_ns + "a", twin_ns + "y" * 100, twin_ns + "}" + "z" * 100]
    try:
        for k in mine + kept:
            t.set(k, make_entry(k, k, now))
        assert asyncio.run(t.aclear(long_ns)) == len(mine)
        assert all(t.get(k) is None for k in mine)
        assert all(t.get(k) is not None for k in kept)
    finally:
        t.close()
        client.close()
        purge_prefix(shared_redis_url, redis_prefix)


def test_clear_on_cluster_visits_every_primary(
    redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    from redis.cluster import RedisCluster

    t = bound(RedisTier(url=redis_cluster.url, prefix=redis_prefix))
    rc = RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0], protocol=2)
    try:
        mine, kept = _populate(t, rc, redis_prefix)
        per_node = [
            len(list(redis.Redis(port=p).scan_iter(match=f"{redis_prefix}:{{ns:*", count=1000)))
            for p in redis_cluster.ports
        ]
        assert all(n > 0 for n in per_node)  # the namespace really is spread over the nodes
        assert t.clear("ns:") == len(mine)
        assert set(rc.scan_iter(match=f"{redis_prefix}*", count=1000)) == kept
        # again through the async face, on a fresh namespace
        now = time.time()
        for i in range(50):
            t.set(f"ns:again{i}", make_entry(f"ns:again{i}", i, now))
        assert asyncio.run(t.aclear("ns:")) == 50
        assert set(rc.scan_iter(match=f"{redis_prefix}*", count=1000)) == kept
    finally:
        t.close()
        rc.close()
        purge_prefix(redis_cluster.url, redis_prefix)


# --- tag times ------------------------------------------------------------------------------------


def test_tag_times_only_move_forward_and_are_per_namespace(
    tier: RedisTier, shared_redis_url: str, redis_prefix: str
) -> None:
    other = bound(RedisTier(url=shared_redis_url, prefix=redis_prefix), namespace="other")
    try:
        t0 = 1_767_225_600.123456789
        assert tier.get_tag_times(["a", "b"]) == [None, None]
        tier.set_tag_times(["a", "b"], t0)
        tier.set_tag_times(["a"], t0 - 10)  # older: ignored
        tier.set_tag_times(["b", "c"], t0 + 0.5)
        assert tier.get_tag_times(["a", "b", "c", "d"]) == [t0, t0 + 0.5, t0 + 0.5, None]
        assert other.get_tag_times(["a"]) == [None]
        asyncio.run(other.aset_tag_times(["a"], t0 + 1))
        assert asyncio.run(other.aget_tag_times(["a"])) == [t0 + 1]
        assert tier.get_tag_times(["a"]) == [t0]
        tier.set_tag_times([], t0)  # nothing to do, no round trip
        assert tier.get_tag_times([]) == []
    finally:
        other.close()


def test_tag_times_of_10000_tags_are_one_round_trip(redis_server: RedisServer) -> None:
    t = bound(RedisTier(url=redis_server.url, socket_timeout=2.0))  # MONITOR slows the server
    tags = [f"tag-{i}" for i in range(10_000)]
    try:
        t.set_tag_times(["warm"], 1.0)  # the script's first EVAL, so the count below is steady-state
        monitor = CommandMonitor(redis_server.port)
        t.set_tag_times(tags, 2.0)
        times = t.get_tag_times(tags)
        monitor.stop()
        assert monitor.client_commands() == ["EVALSHA", "HMGET"]
        assert times == [2.0] * len(tags)
    finally:
        t.close()


# --- RedisBus -------------------------------------------------------------------------------------


class Listener:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.resets = 0
        self.cond = threading.Condition()

    def on_message(self, data: bytes) -> None:
        with self.cond:
            self.messages.append(data)
            self.cond.notify_all()

    def on_reset(self) -> None:
        with self.cond:
            self.resets += 1
            self.cond.notify_all()

    def wait(self, predicate: Callable[[Listener], bool], timeout: float = 3.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)


@pytest.fixture
def channel() -> str:
    return f"tctest-bus-{uuid.uuid4().hex[:12]}"


def test_bus_delivers_in_order_sync_and_async_and_survives_asyncio_run(
    shared_redis_url: str, channel: str
) -> None:
    sender, receiver = RedisBus(shared_redis_url), RedisBus(shared_redis_url)
    got = Listener()
    try:
        receiver.start(channel, got.on_message, got.on_reset)
        assert receiver.wait_ready(3) and got.resets == 1
        for i in range(20):
            sender.publish(channel, b"s%d" % i)

        async def burst(run: int) -> None:  # concurrent apublish calls leave in call order
            await asyncio.gather(*(sender.apublish(channel, b"a%d-%d" % (run, i)) for i in range(20)))

        for run in range(3):  # a Lambda-style handler: a new event loop per invocation
            asyncio.run(burst(run))
        expected = [b"s%d" % i for i in range(20)] + [b"a%d-%d" % (r, i) for r in range(3) for i in range(20)]
        assert got.wait(lambda g: len(g.messages) >= len(expected))
        assert got.messages == expected
        assert got.resets == 1
    finally:
        sender.close()
        receiver.close()


def test_bus_survives_client_kill_and_calls_on_reset_again(redis_server: RedisServer, channel: str) -> None:
    tier = bound(RedisTier(url=redis_server.url))
    bus = RedisBus.for_tier(tier)
    got = Listener()
    try:
        bus.start(channel, got.on_message, got.on_reset)
        assert got.wait(lambda g: g.resets == 1)
        killer = raw_client(redis_server.url)
        assert killer.client_kill_filter(_type="pubsub") == 1  # our server: only our subscriber
        assert got.wait(lambda g: g.resets == 2)  # resubscribed, and said so
        bus.publish(channel, b"after-kill")
        assert got.wait(lambda g: g.messages == [b"after-kill"])
        # The whole server dies and comes back on the same port: reconnect, on_reset again.
        redis_server.restart()
        assert got.wait(lambda g: g.resets == 3, timeout=6)
        bus.publish(channel, b"after-restart")
        assert got.wait(lambda g: g.messages[-1:] == [b"after-restart"])
        killer.close()
    finally:
        bus.close()
        tier.close()


def test_bus_watchdog_notices_a_silent_connection(redis_server: RedisServer, channel: str) -> None:
    """A black-holed connection raises nothing: the PING watchdog must notice it."""
    proxy = TcpProxy(redis_server.port)
    bus = RedisBus(proxy.url, ping_interval=0.2, ping_timeout=0.2)
    got = Listener()
    try:
        bus.start(channel, got.on_message, got.on_reset)
        assert got.wait(lambda g: g.resets == 1)
        proxy.stall()
        deadline = time.monotonic() + 3
        while bus.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not bus.connected
        proxy.reset()  # drop the stalled sockets, pass traffic again
        assert got.wait(lambda g: g.resets >= 2, timeout=6)
    finally:
        bus.close()
        proxy.close()


def test_bus_second_channel_and_second_subscriber_each_get_on_reset(
    shared_redis_url: str, channel: str
) -> None:
    bus = RedisBus(shared_redis_url)
    a, b, c = Listener(), Listener(), Listener()
    try:
        bus.start(channel, a.on_message, a.on_reset)
        assert bus.wait_ready(3)
        bus.start(channel + "-2", b.on_message, b.on_reset)
        bus.start(channel, c.on_message, c.on_reset)
        assert bus.wait_ready(3)
        assert (a.resets, b.resets, c.resets) == (1, 1, 1)
        bus.publish(channel, b"one")
        bus.publish(channel + "-2", b"two")
        assert a.wait(lambda g: g.messages == [b"one"]) and c.wait(lambda g: g.messages == [b"one"])
        assert b.wait(lambda g: g.messages == [b"two"])
    finally:
        bus.close()


def test_bus_on_cluster_reaches_a_subscriber_on_another_node(
    redis_cluster: RedisClusterProcesses, channel: str
) -> None:
    receiver = RedisBus(redis_cluster.url)
    got = Listener()
    try:
        receiver.start(channel, got.on_message, got.on_reset)
        assert receiver.wait_ready(5)
        for port in redis_cluster.ports:  # classic PUBLISH on any node reaches every node
            redis.Redis(port=port).publish(channel, b"from-%d" % port)
        assert got.wait(lambda g: len(g.messages) == 3)
        asyncio.run(receiver.apublish(channel, b"async"))
        receiver.publish(channel, b"sync")
        assert got.wait(lambda g: g.messages[-2:] == [b"async", b"sync"]), got.messages
        for port in redis_cluster.ports:
            redis.Redis(port=port).client_kill_filter(_type="pubsub")
        assert got.wait(lambda g: g.resets >= 2)
        receiver.publish(channel, b"again")
        assert got.wait(lambda g: g.messages[-1:] == [b"again"])
    finally:
        receiver.close()


def test_bus_keeps_passwords_out_of_repr_and_logs(channel: str, caplog: pytest.LogCaptureFixture) -> None:
    bus = RedisBus("redis://user:s3cr3t-pw@127.0.0.1:1/0", connect_timeout=0.05)
    got = Listener()
    try:
        with caplog.at_level("DEBUG", logger="tiercache"):
            bus.start(channel, got.on_message, got.on_reset)
            time.sleep(0.3)
        assert "s3cr3t-pw" not in repr(bus)
        assert "s3cr3t-pw" not in caplog.text
        assert "invalidation bus lost" in caplog.text
        assert got.resets == 0 and not bus.connected
    finally:
        bus.close()


def test_bus_close_stops_the_thread_quickly(shared_redis_url: str, channel: str) -> None:
    bus = RedisBus(shared_redis_url)
    got = Listener()
    bus.start(channel, got.on_message, got.on_reset)
    assert bus.wait_ready(3)
    thread = bus._thread
    assert thread is not None and thread.is_alive()
    started = time.monotonic()
    asyncio.run(bus.aclose())
    assert time.monotonic() - started < 1.0
    assert not thread.is_alive()
    with pytest.raises(RuntimeError):
        bus.start(channel, got.on_message, got.on_reset)
