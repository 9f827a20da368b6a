"""Issue 14 on real Redis: a broken bus is noticed within the liveness bound (standalone and
Cluster), tag times in Redis cannot move back or be forged, channels follow the tier's prefix,
and C1 propagation on Cluster. Run with ``-s`` to see the measured figures."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from tests.integration.test_redis_coherence_acceptance import Worker, _percentile
from tests.redis_servers import RedisClusterProcesses, TcpProxy, purge_prefix
from tiercache import EventKind, TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisBus, RedisTier
from tiercache.signing import SignedCodec

pytestmark = pytest.mark.redis

LIVENESS = 1.0  # RedisBus's default bound


def settle_old(reader: Worker, key: str, old: Any) -> None:
    """Read until ``old`` sits in the reader's L1."""
    for _ in range(200):
        answer = reader.call(op="get", key=key)
        assert answer["value"] == old
        if answer["l1"] and reader.call(op="get", key=key)["l1"]:
            return
        time.sleep(0.005)
    raise AssertionError("the old value never settled in the reader's L1")


# --- liveness: standalone, bus black-holed -------------------------------------------------------


def test_black_holed_bus_old_value_served_at_most_the_liveness_bound(
    shared_redis_url: str, redis_prefix: str
) -> None:
    """B's bus connection goes through a proxy that stops forwarding (the socket stays open, as a
    black hole does). A writes right after; B must stop serving the old value within 1 s."""
    port = int(shared_redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port)
    writer = reader = None
    delays = []
    try:
        writer = Worker(shared_redis_url, redis_prefix, "bh")
        reader = Worker(shared_redis_url, redis_prefix, "bh", mode=f"bus@{proxy.url}")
        for trial in range(2):
            key, old = f"k{trial}", f"old-{trial}"
            writer.call(op="set", key=key, value=old)
            time.sleep(0.3)  # B's own heartbeats are flowing again after the previous trial
            settle_old(reader, key, old)
            reader.send(op="watch", key=key, old=old, timeout=LIVENESS * 5)
            assert reader.recv()["watching"]
            proxy.stall()
            done = writer.call(op="set", key=key, value=f"new-{trial}")["t"]
            seen = reader.recv(timeout=10)
            delays.append(seen["t"] - done)
            assert seen["value"] == f"new-{trial}", seen
            proxy.passthrough()
            proxy.reset()  # (the stalled connections are dropped; the bus reconnects)
            time.sleep(LIVENESS * 1.5)
        print(f"\nbus black-holed: old value served for {[round(d, 3) for d in delays]} s after the write")
        assert max(delays) <= LIVENESS
    finally:
        for w in (writer, reader):
            if w is not None:
                w.close()
        proxy.close()
        purge_prefix(shared_redis_url, redis_prefix)


def test_black_holed_bus_on_cluster_old_value_served_at_most_the_liveness_bound(
    redis_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    """The same on the real local Cluster: B's bus goes to a cluster node through the proxy."""
    proxy = TcpProxy(redis_cluster.ports[1])
    writer = reader = None
    try:
        writer = Worker(redis_cluster.url, redis_prefix, "bhc")
        reader = Worker(redis_cluster.url, redis_prefix, "bhc", mode=f"bus@{proxy.url}")
        writer.call(op="set", key="k", value="old")
        settle_old(reader, "k", "old")
        reader.send(op="watch", key="k", old="old", timeout=LIVENESS * 5)
        assert reader.recv()["watching"]
        proxy.stall()
        done = writer.call(op="set", key="k", value="new")["t"]
        seen = reader.recv(timeout=10)
        print(f"\nCluster, bus black-holed: old value served for {seen['t'] - done:.3f} s after the write")
        assert seen["value"] == "new" and seen["t"] - done <= LIVENESS
    finally:
        for w in (writer, reader):
            if w is not None:
                w.close()
        proxy.close()
        purge_prefix(redis_cluster.url, redis_prefix)


def test_a_failing_publish_is_a_gap_for_the_publisher_itself(
    shared_redis_url: str, redis_prefix: str
) -> None:
    port = int(shared_redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port)
    l1 = MemoryTier()
    l2 = RedisTier(url=shared_redis_url, prefix=redis_prefix)
    bus = RedisBus(url=proxy.url, socket_timeout=0.1, connect_timeout=0.1)
    events: list[Any] = []
    cache = TieredCache([l1, l2], ttl=60, namespace="pf", bus=bus, on_event=events.append).sync
    try:
        cache.set("a", 1)
        assert bus.wait_ready(5)
        cache.set("b", 2)
        assert l1.get("pf:b") is not None
        proxy.stall()
        cache.set("c", 3)  # the write succeeds, its publish fails
        coh = cache._cache._rt.coherence
        assert coh.deaf and coh.l1_off
        assert l1.get("pf:b") is None  # L1 cleared: we may have missed the others' messages too
        assert cache.get("b") == 2 and l1.get("pf:b") is None  # served from Redis, not cached in L1
        assert any(e.kind is EventKind.BUS_GAP for e in events)
        proxy.passthrough()
        proxy.reset()
        deadline = time.monotonic() + 5
        while coh.deaf and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not coh.deaf  # our own heartbeat came back
        cache.set("b", 4)  # a version newer than any floor raised by the recovery or reconnection
        assert cache.get("b") == 4 and l1.get("pf:b") is not None
    finally:
        cache.close()
        proxy.close()
        purge_prefix(shared_redis_url, redis_prefix)


# --- tag times in Redis ---------------------------------------------------------------------------


def test_tag_times_in_redis_cannot_disable_or_undo_an_invalidation(
    shared_redis_url: str, redis_prefix: str
) -> None:
    raw = redis.Redis.from_url(shared_redis_url)
    l2 = RedisTier(url=shared_redis_url, prefix=redis_prefix)
    cache = TieredCache([MemoryTier(), l2], ttl=60, namespace="tt", tag_refresh=0.05).sync
    tags_key = f"{redis_prefix}:tags:{{tt}}"
    opened = [cache]

    def fresh() -> Any:  # another process: it knows only what Redis says
        opened.append(
            TieredCache([RedisTier(url=shared_redis_url, prefix=redis_prefix)], ttl=60, namespace="tt").sync
        )
        return opened[-1]

    try:
        for poison in (b"nan", b"inf", b"1e300", b"banana"):
            cache.set("k", "v", tags=("t",))
            time.sleep(0.01)
            cache.invalidate_tags("t")
            raw.hset(tags_key, "t", poison)  # the invalidation time is overwritten with garbage
            assert fresh().get("k") is None, poison  # never re-validated by it
            time.sleep(0.01)
            cache.invalidate_tags("t")  # and a later invalidate_tags repairs the field
            repaired = float(raw.hget(tags_key, "t") or b"0")
            assert repaired <= time.time() + 1, poison
            cache.set("k2", "v", tags=("t",))
            assert fresh().get("k2") == "v"  # entries written after that are valid again
        # HDEL after an invalidation does not re-validate what this process knows was
        # invalidated, even after its L1 and tag times were reset (a bus gap or reconnection)
        cache.set("old", "v", tags=("u",))
        time.sleep(0.01)
        cache.invalidate_tags("u")
        raw.hdel(tags_key, "u")
        cache._cache._rt.coherence.clear_local()
        time.sleep(0.1)  # past tag_refresh: the time is re-read from Redis (now missing)
        assert cache.get("old") is None
    finally:
        for c in opened:
            c.close()
        raw.close()
        purge_prefix(shared_redis_url, redis_prefix)


def test_signed_tag_times_cannot_be_forged(shared_redis_url: str, redis_prefix: str) -> None:
    raw = redis.Redis.from_url(shared_redis_url)
    codec = SignedCodec([b"s" * 32])
    events: list[Any] = []

    def fresh() -> Any:  # a process that never learnt the tag's time from anywhere but Redis
        l2 = RedisTier(url=shared_redis_url, prefix=redis_prefix)
        return TieredCache([l2], ttl=60, namespace="ts", codec=codec, on_event=events.append).sync

    cache = fresh()
    tags_key = f"{redis_prefix}:tags:{{ts}}"
    opened = [cache]
    try:
        cache.set("k", "v", tags=("t",))
        time.sleep(0.01)
        cache.invalidate_tags("t")
        stored = raw.hget(tags_key, "t")
        assert stored is not None and stored.count(b"|") == 2  # time|kid|mac
        assert cache.get("k") is None
        cache.set("k", "v2", tags=("t",))
        assert cache.get("k") == "v2"
        # Someone with access to Redis moves the tag's time back (to re-validate old entries):
        raw.hset(tags_key, "t", b"1.0")
        opened.append(fresh())
        assert opened[-1].get("k") is None  # an untrusted time counts as "invalidated now"
        assert any(e.kind is EventKind.CORRUPT for e in events)
        # or copies a genuinely signed time of another tag: refused too (the MAC names the tag)
        cache.invalidate_tags("other")
        raw.hset(tags_key, "t", raw.hget(tags_key, "other") or b"")
        opened.append(fresh())
        assert opened[-1].get("k") is None
        # and a signed time is accepted by a reader with the key
        cache.invalidate_tags("t")
        time.sleep(0.01)
        cache.set("k", "v3", tags=("t",))
        opened.append(fresh())
        assert opened[-1].get("k") == "v3"
    finally:
        for c in opened:
            c.close()
        raw.close()
        purge_prefix(shared_redis_url, redis_prefix)


# --- channel naming --------------------------------------------------------------------------------


def test_deployments_with_different_prefixes_do_not_cross(shared_redis_url: str, redis_prefix: str) -> None:
    def make(prefix: str) -> tuple[TieredCache, MemoryTier, RedisBus]:
        l1, l2 = MemoryTier(), RedisTier(url=shared_redis_url, prefix=prefix)
        bus = RedisBus.for_tier(l2)
        return TieredCache([l1, l2], ttl=60, namespace="same", bus=bus), l1, bus

    a, _, bus_a = make(redis_prefix + "A")
    b, b_l1, bus_b = make(redis_prefix + "B")
    b2, b2_l1, bus_b2 = make(redis_prefix + "B")
    try:
        assert a._rt.coherence.channel == f"{redis_prefix}A:bus:same"
        for c in (a, b, b2):
            c.sync.get("warm")
        assert bus_a.wait_ready(5) and bus_b.wait_ready(5) and bus_b2.wait_ready(5)
        b.sync.set("k", "b-value")
        assert b2.sync.get("k") == "b-value" and b2_l1.get("same:k") is not None
        for i in range(5):
            a.sync.set("k", f"a-{i}")
            a.sync.delete("k")
            a.sync.clear()
        time.sleep(0.2)
        assert b_l1.get("same:k") is not None and b2_l1.get("same:k") is not None
        b.sync.set("k", "b2")  # the same prefix still hears each other
        deadline = time.monotonic() + 2
        while b2_l1.get("same:k") is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert b2_l1.get("same:k") is None
    finally:
        for c in (a, b, b2):
            c.sync.close()
        purge_prefix(shared_redis_url, redis_prefix + "A")
        purge_prefix(shared_redis_url, redis_prefix + "B")


# --- Cluster ------------------------------------------------------------------------------------------


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterProcesses]:
    cluster = RedisClusterProcesses().start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


def _slot_owner(port: int, slot: int) -> int:
    r = redis.Redis(host="127.0.0.1", port=port, protocol=2)
    try:
        for start, end, primary, *_ in r.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
    finally:
        r.close()
    raise AssertionError("slot not covered")


def test_cluster_channel_node_killed_old_value_served_at_most_the_liveness_bound(
    own_cluster: RedisClusterProcesses, redis_prefix: str
) -> None:
    url = own_cluster.url.replace("redis+cluster", "redis+cluster")
    namespace = "ck"
    channel = f"{redis_prefix}:bus:{namespace}"
    channel_port = _slot_owner(own_cluster.ports[0], key_slot(channel.encode()))
    naming = RedisTier(url=url, prefix=redis_prefix)
    key = next(
        f"k{i}"
        for i in range(1000)
        if _slot_owner(own_cluster.ports[0], key_slot(naming._vkey(f"{namespace}:k{i}").encode()))
        != channel_port
    )
    writer = Worker(url, redis_prefix, namespace)
    # One reader subscribes where the bus puts it (the channel's node, which dies); the other is
    # pinned to a node that survives, so only the writer's publishes moving to a live node can
    # tell it anything.
    other = next(p for p in own_cluster.ports if p != channel_port)
    readers = [
        Worker(url, redis_prefix, namespace),
        Worker(url, redis_prefix, namespace, mode=f"bus@redis://127.0.0.1:{other}/0"),
    ]
    try:
        writer.call(op="set", key=key, value="old")
        for reader in readers:
            settle_old(reader, key, "old")
            reader.send(op="watch", key=key, old="old", timeout=LIVENESS * 5)
            assert reader.recv()["watching"]
        node = next(n for n in own_cluster.nodes if n.port == channel_port)
        node.kill()
        done = writer.call(op="set", key=key, value="new")["t"]
        delays = []
        for reader in readers:
            seen = reader.recv(timeout=10)
            delays.append(seen["t"] - done)
            assert seen["value"] == "new"
        print(
            f"\nCluster channel node killed: old value served for {[round(d * 1000, 1) for d in delays]} ms"
        )
        assert max(delays) <= LIVENESS
        # and the bus keeps working through another node: a later write reaches both readers fast
        # ("mid" is written after the reconnections, so no floor they raised refuses it in L1;
        # until a reader has re-subscribed it may miss "mid" for up to the liveness bound)
        time.sleep(LIVENESS * 1.5)
        writer.call(op="set", key=key, value="mid")
        for reader in readers:
            settle_old(reader, key, "mid")
            reader.send(op="watch", key=key, old="mid", timeout=LIVENESS * 5)
            assert reader.recv()["watching"]
        done = writer.call(op="set", key=key, value="newer")["t"]
        delays = []
        for reader in readers:
            seen = reader.recv(timeout=10)
            delays.append(seen["t"] - done)
            assert seen["value"] == "newer"
        print(f"after failover to another node: {[round(d * 1000, 1) for d in delays]} ms")
        assert max(delays) <= 0.1
    finally:
        for w in (writer, *readers):
            w.close()
        naming.close()


def test_c1_on_cluster_p99_within_10ms(redis_cluster: RedisClusterProcesses, redis_prefix: str) -> None:
    """From ``set`` returning in one process to another process's L1 dropping the old value."""
    workers = [Worker(redis_cluster.url, redis_prefix, "c1") for _ in range(2)]
    delays: list[float] = []
    try:
        for i in range(120):
            writer, reader = workers[i % 2], workers[1 - i % 2]
            key, old = f"k{i}", f"old-{i}"
            writer.call(op="set", key=key, value=old)
            settle_old(reader, key, old)
            reader.send(op="watch", key=key, old=old, timeout=2.0)
            assert reader.recv()["watching"]
            done = writer.call(op="set", key=key, value=f"new-{i}")["t"]
            seen = reader.recv()
            assert seen["value"] == f"new-{i}"
            delays.append(seen["t"] - done)
        figures = {
            "n": len(delays),
            "p50_ms": round(statistics.median(delays) * 1000, 2),
            "p99_ms": round(_percentile(delays, 0.99) * 1000, 2),
            "max_ms": round(max(delays) * 1000, 2),
        }
        print(
            "\nC1 on Cluster (reader's L1 drops the old value - writer's set returned):", json.dumps(figures)
        )
        assert _percentile(delays, 0.99) <= 0.010
    finally:
        for w in workers:
            w.close()
        purge_prefix(redis_cluster.url, redis_prefix)


# --- fork ------------------------------------------------------------------------------------------


def test_a_forked_child_is_a_new_peer_on_the_bus(shared_redis_url: str, redis_prefix: str) -> None:
    """The child gets its own origin and heartbeat: the parent hears its writes (with the
    parent's origin it would ignore them as its own) and does not see it as silent."""
    import os

    l1, l2 = MemoryTier(), RedisTier(url=shared_redis_url, prefix=redis_prefix)
    bus = RedisBus.for_tier(l2)
    cache = TieredCache([l1, l2], ttl=60, namespace="fk", bus=bus).sync
    try:
        cache.get("warm-up")  # subscribes (and clears L1 once subscribed)
        assert bus.wait_ready(5)
        time.sleep(0.05)
        cache.set("k", "parent")
        assert l1.get("fk:k") is not None
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                if bus.wait_ready(5):
                    time.sleep(LIVENESS / 2)
                    cache.set("k", "child")
                    time.sleep(LIVENESS / 2)
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        deadline = time.monotonic() + 1
        while l1.get("fk:k") is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert cache.get("k") == "child"
    finally:
        cache.close()
        purge_prefix(shared_redis_url, redis_prefix)


# --- a foreign publisher on real Redis -------------------------------------------------------------


def test_a_foreign_publisher_on_real_redis_cannot_touch_a_signed_cache(
    shared_redis_url: str, redis_prefix: str
) -> None:
    codec = SignedCodec([b"s" * 32])
    l1, l2 = MemoryTier(), RedisTier(url=shared_redis_url, prefix=redis_prefix)
    bus = RedisBus.for_tier(l2)
    cache = TieredCache([l1, l2], ttl=60, namespace="fp", bus=bus, codec=codec).sync
    raw = redis.Redis.from_url(shared_redis_url)
    try:
        cache.get("warm-up")
        assert bus.wait_ready(5)
        time.sleep(0.05)
        cache.set("k", "v", tags=("t",))
        channel = cache._cache._rt.coherence.channel
        base = {"tcbus": 1, "ns": "fp", "k": ["fp:k"], "t": ["t"], "at": time.time(), "o": "f" * 32}
        for q, op in enumerate(("set", "delete", "expire", "tags", "clear")):
            raw.publish(channel, json.dumps({**base, "op": op, "n": 2**63 - 1, "q": q + 1}))
        raw.publish(channel, b'{"tcbus":1,"k":' + b"[" * 5000 + b"]" * 5000 + b"}")
        raw.publish(channel, b"x" * (9 * 2**20))
        deadline = time.monotonic() + 2
        wire = cache._cache._rt.coherence.wire
        while wire.rejected_total < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert wire.rejected_total == 7
        assert l1.get("fp:k") is not None and cache.get("k") == "v"
    finally:
        cache.close()
        raw.close()
        purge_prefix(shared_redis_url, redis_prefix)
