"""Issue 6 acceptance on real Redis: L1 coherence across 3 processes, reconnects, tags, clear.

The propagation numbers (p50/p99/max) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.redis_servers import CommandMonitor, RedisServer, purge_prefix
from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisBus, RedisTier
from tiercache.testing import make_entry

pytestmark = pytest.mark.redis

BUS_DELAY = 0.05  # the issue's bound: other processes stop serving the old value within 50 ms (p99)


class Worker:
    def __init__(self, url: str, prefix: str, namespace: str, mode: str = "bus") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.coherence_worker", url, prefix, namespace, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        first = self._line(15)
        if first != "ready":
            raise RuntimeError(f"worker did not start: {first!r}")

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("worker did not answer")
        return self.proc.stdout.readline().strip()

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 10) -> Any:
        return json.loads(self._line(timeout))

    def call(self, timeout: float = 10, **cmd: Any) -> Any:
        self.send(**cmd)
        return self.recv(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def workers(shared_redis_url: str, redis_prefix: str) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for _ in range(3):
            started.append(Worker(shared_redis_url, redis_prefix, "mp"))
        yield started
    finally:
        for w in started:
            w.close()
        purge_prefix(shared_redis_url, redis_prefix)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_other_processes_stop_serving_the_old_value_within_50ms(workers: list[Worker]) -> None:
    """Per trial: everyone holds ``old`` in L1; one process writes; the others poll their cache
    until it stops returning ``old``. Latency = first new answer - the writer's call returning."""
    delays: dict[str, list[float]] = defaultdict(list)
    trials = 60  # per operation kind; x2 readers each
    for i in range(trials * 3):
        kind = ("set", "delete", "tags")[i % 3]
        writer, readers = workers[i % 3], [w for j, w in enumerate(workers) if j != i % 3]
        key, tag, old = f"k{i}", f"tag{i}", f"old-{i}"
        writer.call(op="set", key=key, value=old, tags=[tag])
        for r in readers:
            # The writer's own "set" message may reach a reader after its first read and drop
            # that copy (the core drops copies of the message's version too): read until the old
            # value sits in the reader's L1.
            for _ in range(100):
                answer = r.call(op="get", key=key)
                assert answer["value"] == old
                if answer["l1"] and r.call(op="get", key=key)["l1"]:
                    break
                time.sleep(0.002)
            else:
                raise AssertionError("the old value never settled in a reader's L1")
        for r in readers:
            r.send(op="watch", key=key, old=old, timeout=2.0)
            assert r.recv()["watching"]
        if kind == "set":
            done = writer.call(op="set", key=key, value=f"new-{i}")["t"]
        elif kind == "delete":
            done = writer.call(op="delete", key=key)["t"]
        else:
            done = writer.call(op="tags", tags=[tag])["t"]
        for r in readers:
            seen = r.recv()
            assert seen["value"] != old, f"{kind}: a reader still served the old value after 2 s"
            delays[kind].append(seen["t"] - done)
    every = [d for ds in delays.values() for d in ds]
    report = {
        kind: {
            "n": len(ds),
            "p50_ms": round(statistics.median(ds) * 1000, 2),
            "p99_ms": round(_percentile(ds, 0.99) * 1000, 2),
            "max_ms": round(max(ds) * 1000, 2),
        }
        for kind, ds in {**delays, "all": every}.items()
    }
    print("\npropagation (reader sees the change - writer's call returned):", json.dumps(report))
    assert _percentile(every, 0.99) <= BUS_DELAY


def run_history(workers: list[Worker], seconds: float) -> list[list[Any]]:
    # Ten keys: each process rewrites a given key only every ~50-100 ms itself, so an L1 copy
    # that nobody invalidates is served long enough for the checker to see it (see the test below).
    keys = [f"h{i}" for i in range(10)]
    for n, w in enumerate(workers):
        w.send(op="history", keys=keys, seconds=seconds, seed=n)
    return [op for w in workers for op in w.recv(timeout=30)["ops"]]


def stale_reads(ops: list[list[Any]], allowance: float) -> tuple[list[tuple[Any, ...]], float, int]:
    """Reads that returned a value (or absence) already superseded, more than ``allowance``
    seconds before the read began, by a write that had *completed*; and the worst staleness.

    A read may reflect the initial absence or any write that began before the read ended. Its
    staleness is, for the most favourable such write ``w``, how long before the read began some
    write that started after ``w`` ended had itself completed (0 if none had).
    """
    writes: dict[str, list[tuple[Any, float, float]]] = defaultdict(list)  # key -> (value, start, end)
    for kind, key, value, start, end in ops:
        if kind in ("set", "delete"):
            writes[key].append((value, start, end))
    violations: list[tuple[Any, ...]] = []
    worst = 0.0
    reads = [(key, value, start, end) for kind, key, value, start, end in ops if kind == "get"]
    for key, value, start, end in reads:
        candidates = [(None, float("-inf"), float("-inf"))] if value is None else []
        candidates += [w for w in writes[key] if w[0] == value and w[1] < end]
        if not candidates:
            violations.append(("read a value nobody wrote", key, value))
            continue
        staleness = min(
            max((start - w2[2] for w2 in writes[key] if w2[1] > w[2] and w2[2] < start), default=0.0)
            for w in candidates
        )
        worst = max(worst, staleness)
        if staleness > allowance:
            violations.append(("stale read", key, value, round(staleness * 1000, 1)))
    return violations, worst, len(reads)


def test_history_across_processes_has_no_read_older_than_the_bus_delay(workers: list[Worker]) -> None:
    """Three processes run random set/delete/get on 10 keys for 2.5 s; the checker finds no read
    of a value superseded by a write acknowledged more than the bus delay before the read."""
    ops = run_history(workers, 2.5)
    violations, worst, reads = stale_reads(ops, BUS_DELAY)
    assert reads > 300 and len(ops) - reads > 150
    print(f"\nhistory: {reads} reads, {len(ops) - reads} writes; worst staleness {worst * 1000:.1f} ms")
    assert not violations, violations[:10]


def test_history_checker_catches_stale_l1_reads_without_a_bus(
    shared_redis_url: str, redis_prefix: str
) -> None:
    """The same run without a bus: L1 copies live for their whole TTL, and the checker says so."""
    started = [Worker(shared_redis_url, redis_prefix, "nobus", mode="nobus") for _ in range(3)]
    try:
        violations, worst, _ = stale_reads(run_history(started, 1.0), BUS_DELAY)
        assert violations and worst > BUS_DELAY
    finally:
        for w in started:
            w.close()
        purge_prefix(shared_redis_url, redis_prefix)


def test_killed_and_restored_bus_connection_clears_the_receivers_l1(redis_server: RedisServer) -> None:
    l1 = MemoryTier()
    l2 = RedisTier(url=redis_server.url)
    bus = RedisBus.for_tier(l2)
    cache = TieredCache([l1, l2], ttl=60, namespace="rx", bus=bus)
    other = RedisTier(url=redis_server.url)  # writes behind the cache's back: no bus message
    try:
        cache.sync.set("k", "old")
        assert bus.wait_ready(5)
        assert cache.sync.get("k") == "old"
        now = time.time()
        other.bind(l2_binding(cache))
        other.set("rx:k", make_entry("rx:k", "new", now))
        assert cache.sync.get("k") == "old"  # served from L1: nobody told it
        count = bus.subscriptions
        killer = redis.Redis.from_url(redis_server.url)
        assert killer.client_kill_filter(_type="pubsub") == 1
        deadline = time.monotonic() + 5
        while bus.subscriptions == count and time.monotonic() < deadline:
            time.sleep(0.005)
        assert bus.wait_ready(5) and bus.subscriptions == count + 1
        assert l1.get("rx:k") is None  # on_reset cleared L1 for the namespace
        assert cache.sync.get("k") == "new"
        killer.close()
    finally:
        cache.sync.close()
        other.close()


def l2_binding(cache: TieredCache) -> Any:
    from tiercache._serde import JsonCodec
    from tiercache._tier import TierBinding

    return TierBinding(clock=cache.clock, codec=JsonCodec(), namespace=cache.namespace)


def test_invalidating_a_tag_of_10000_entries_is_one_round_trip_plus_one_publish(
    redis_server: RedisServer,
) -> None:
    l2 = RedisTier(url=redis_server.url, socket_timeout=1.0)
    bus = RedisBus.for_tier(l2)
    cache = TieredCache([MemoryTier(), l2], ttl=60, namespace="tg", bus=bus)
    receiver_l2 = RedisTier(url=redis_server.url, socket_timeout=1.0)
    receiver_bus = RedisBus.for_tier(receiver_l2)
    receiver = TieredCache([MemoryTier(), receiver_l2], ttl=60, namespace="tg", bus=receiver_bus)
    try:
        now = time.time() - 1
        entries = [make_entry(f"tg:e{i}", i, now, tags=("bulk",)) for i in range(10_000)]
        for start in range(0, len(entries), 1000):
            l2.set_many([(e.key, e) for e in entries[start : start + 1000]])
        sample = [f"e{i}" for i in range(0, 10_000, 500)]
        assert [receiver.sync.get(k) for k in sample] == [int(k[1:]) for k in sample]  # now in its L1
        assert receiver_bus.wait_ready(5)
        cache.sync.invalidate_tags("warm-up")  # the script's first EVAL; the bus subscribes
        assert bus.wait_ready(5)
        monitor = CommandMonitor(redis_server.port)
        cache.sync.invalidate_tags("bulk")
        monitor.stop()
        assert monitor.client_commands() == ["EVALSHA", "PUBLISH"]
        deadline = time.monotonic() + 2
        while receiver.sync.get(sample[0]) is not None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert [receiver.sync.get(k) for k in sample] == [None] * len(sample)
        assert cache.sync.get("e123") is None
    finally:
        cache.sync.close()
        receiver.sync.close()


def test_cache_clear_leaves_other_namespaces_and_foreign_keys(
    shared_redis_url: str, redis_prefix: str
) -> None:
    def make(namespace: str) -> TieredCache:
        l2 = RedisTier(url=shared_redis_url, prefix=redis_prefix)
        return TieredCache([MemoryTier(), l2], ttl=60, namespace=namespace, bus=RedisBus.for_tier(l2))

    app, neighbour, receiver = make("app"), make("appx"), make("app")
    raw = redis.Redis.from_url(shared_redis_url)
    foreign = [f"{redis_prefix}:app:x", f"{redis_prefix}-app:{{app:x}}", f"{redis_prefix}x:{{app:1}}"]
    try:
        for i in range(50):
            app.sync.set(f"{i}", i, tags=("t",))
            neighbour.sync.set(f"{i}", -i)
        app.sync.set("a}b", "brace")
        app.sync.set("long" + "x" * 500, "long")
        app.sync.invalidate_tags("old")
        for k in foreign:
            raw.set(k, b"foreign", ex=60)
        assert receiver.sync.get("7") == 7
        before = set(raw.scan_iter(match=f"{redis_prefix}*", count=1000))
        app.sync.clear()
        after = set(raw.scan_iter(match=f"{redis_prefix}*", count=1000))
        removed = before - after
        assert len(removed) == 52
        assert all(k.startswith(f"{redis_prefix}:{{app:".encode()) for k in removed)
        assert {k.encode() for k in foreign} <= after
        assert [neighbour.sync.get(f"{i}") for i in range(50)] == [-i for i in range(50)]
        deadline = time.monotonic() + 2
        while receiver.sync.get("7") is not None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert receiver.sync.get("7") is None  # the receiver's L1 was cleared by the bus
    finally:
        for c in (app, neighbour, receiver):
            c.sync.close()
        raw.close()
        purge_prefix(shared_redis_url, redis_prefix)
