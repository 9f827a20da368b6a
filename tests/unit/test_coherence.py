"""Coherence in one process with simulated peers: the bus, tags, expire, clear, delete-during-load."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tiercache import EventKind, TieredCache, tiered_cache
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier, LocalBus


class Peers:
    """N caches ("processes") with their own L1, one shared remote tier and one bus hub."""

    def __init__(self, n: int = 2, namespace: str = "app", **options: Any) -> None:
        self.clock = FakeClock()
        self.store: dict[str, tuple[bytes, float]] = {}
        self.tag_times: dict[str, float] = {}
        self.hub: dict[str, list[LocalBus]] = {}
        self.l1 = [MemoryTier() for _ in range(n)]
        self.remote = [FakeRemoteTier(self.store, tag_times=self.tag_times) for _ in range(n)]
        self.buses = [LocalBus(self.hub) for _ in range(n)]
        self.events: list[list[Any]] = [[] for _ in range(n)]
        self.caches = [
            TieredCache(
                [self.l1[i], self.remote[i]],
                clock=self.clock,
                namespace=namespace,
                ttl=60,
                bus=self.buses[i],
                on_event=self.events[i].append,
                **options,
            )
            for i in range(n)
        ]

    def in_l1(self, i: int, key: str) -> Any:
        entry = self.l1[i].get(f"{self.caches[i].namespace}:{key}")
        return None if entry is None else entry.value


def test_set_in_one_process_drops_the_old_l1_copy_in_the_others() -> None:
    p = Peers(3)
    a, b, c = (cache.sync for cache in p.caches)
    a.set("k", "v1")
    assert b.get("k") == "v1" and c.get("k") == "v1"
    assert p.in_l1(1, "k") == "v1"
    a.set("k", "v2")
    assert p.in_l1(1, "k") is None and p.in_l1(2, "k") is None  # dropped, not re-read (no storm)
    assert p.in_l1(0, "k") == "v2"  # own message ignored
    assert b.get("k") == "v2"


def test_delete_reaches_other_processes_l1() -> None:
    p = Peers(2)
    a, b = (cache.sync for cache in p.caches)
    a.set("k", "v")
    assert b.get_cached("k", lambda: "loader") == "v"
    a.delete("k")
    assert p.in_l1(1, "k") is None
    assert b.get_cached("k", lambda: "reloaded") == "reloaded"


def test_the_decorators_inline_hit_path_sees_invalidations() -> None:
    p = Peers(2)
    calls: list[int] = []

    @tiered_cache(p.caches[1], key="user:{uid}")
    def user(uid: int) -> str:
        calls.append(uid)
        return f"loaded-{len(calls)}"

    assert user(1) == user(1) == "loaded-1"
    p.caches[0].sync.delete("user:1")
    assert user(1) == "loaded-2"


def test_a_sequence_gap_clears_l1_for_the_namespace() -> None:
    p = Peers(2)
    a, b = (cache.sync for cache in p.caches)
    b.get("x")  # b subscribes (lazily, on first use)
    a.set("x", 1)  # the first message from a sets b's baseline for a's sequence
    b.get("x")
    b.set("y", 2)  # b's own L1 holds y
    p.buses[1].drop_next(1)
    a.set("lost", 3)  # b never hears of this one
    assert p.in_l1(1, "y") == 2
    a.set("z", 4)  # seq jumps by 2: b clears its L1
    assert p.in_l1(1, "y") is None and p.in_l1(1, "x") is None
    assert any(e.kind == EventKind.BUS_GAP for e in p.events[1])
    assert p.caches[1].stats.bus_gaps == 1


def test_a_reconnect_clears_l1_for_the_namespace() -> None:
    p = Peers(2)
    b = p.caches[1].sync
    b.set("k", "v")
    assert p.in_l1(1, "k") == "v"
    p.buses[1].disconnect()
    p.caches[0].sync.set("k", "missed")
    p.buses[1].reconnect()
    assert p.in_l1(1, "k") is None
    assert b.get("k") == "missed"


def test_bus_down_bounds_staleness_by_the_entry_lifetime() -> None:
    p = Peers(2)
    a, b = (cache.sync for cache in p.caches)
    a.set("k", "v1", ttl=5)
    b.get("k")
    p.buses[0].disconnect()  # publishing fails: counted, the write itself succeeds
    a.set("k", "v2", ttl=5)
    assert b.get("k") == "v1"  # stale L1 copy, as the bus is down...
    p.clock.advance(5.1)
    assert b.get("k") is None  # ...but never past its own lifetime
    assert any(e.kind == EventKind.TIER_ERROR for e in p.events[0])


def test_other_namespaces_are_not_touched() -> None:
    p = Peers(1, namespace="app")
    other = TieredCache(
        [p.l1[0], FakeRemoteTier(p.store)], clock=p.clock, namespace="other", bus=LocalBus(p.hub)
    )
    other.sync.set("k", "theirs")
    p.caches[0].sync.set("k", "ours")
    p.caches[0].sync.clear()
    assert other.sync.get("k") == "theirs"
    assert p.caches[0].sync.get("k") is None
    assert "other:k" in p.store and "app:k" not in p.store


def test_clear_reaches_other_processes() -> None:
    p = Peers(2)
    a, b = (cache.sync for cache in p.caches)
    b.set("mine", 1)
    a.clear()
    assert p.in_l1(1, "mine") is None and b.get("mine") is None


class SlowReads(FakeRemoteTier):
    """Async reads take the value first and answer 50 ms later, as over a slow network."""

    async def aget(self, key: str) -> Any:
        entry = self.get(key)
        await asyncio.sleep(0.05)
        return entry


@pytest.mark.parametrize("cleared_by", ["this process", "another process"])
def test_a_value_read_before_a_clear_does_not_land_in_l1_after_it(cleared_by: str) -> None:
    store: dict[str, tuple[bytes, float]] = {}
    hub: dict[str, list[LocalBus]] = {}
    l1 = MemoryTier()
    reader = TieredCache([l1, SlowReads(store)], namespace="app", ttl=60, bus=LocalBus(hub))
    other = TieredCache([MemoryTier(), FakeRemoteTier(store)], namespace="app", ttl=60, bus=LocalBus(hub))
    clearer = reader if cleared_by == "this process" else other

    async def scenario() -> tuple[Any, Any]:
        await reader.set("k", "old")
        l1.clear("app:")  # only the shared copy is left
        read = asyncio.ensure_future(reader.lookup("k", lambda: "loaded"))
        await asyncio.sleep(0.01)  # the read has taken "old" and is on its way back
        await clearer.clear()
        first = await read
        return first.value, await reader.lookup("k", lambda: "loaded")

    first, after = asyncio.run(scenario())
    assert first == "old"  # answered from before the clear: acceptable, it was read before it
    assert l1.get("app:k") is None or l1.get("app:k").value == "loaded"  # type: ignore[union-attr]
    assert (after.value, after.source) == ("loaded", "LOADED")  # not "old" from L1


# --- tags ------------------------------------------------------------------------------------


def test_invalidate_tags_hides_tagged_entries_everywhere_and_spares_the_rest() -> None:
    p = Peers(2)
    a, b = (cache.sync for cache in p.caches)
    a.set("u1", "ada", tags=["users"])
    a.set("u2", "bob", tags=["users", "admins"])
    a.set("cfg", "x")
    for key in ("u1", "u2", "cfg"):
        b.get(key)
    p.clock.advance(0.001)
    calls_before = p.remote[0].calls["tags"]
    a.invalidate_tags("users")
    assert p.remote[0].calls["tags"] == calls_before + 1  # one write for any number of entries
    for cache in (a, b):
        assert cache.get("u1") is None and cache.get("u2") is None
        assert cache.get("cfg") == "x"
    p.clock.advance(0.001)
    a.set("u1", "ada2", tags=["users"])  # created after the invalidation: valid
    assert b.get("u1") == "ada2"


def test_tag_invalidation_reaches_the_inline_hit_path_and_get_cached() -> None:
    p = Peers(2)
    calls: list[int] = []

    @tiered_cache(p.caches[1], key="u:{uid}", tags=("users",))
    def user(uid: int) -> int:
        calls.append(uid)
        return len(calls)

    assert user(1) == user(1) == 1
    p.clock.advance(0.01)
    p.caches[0].sync.invalidate_tags("users")
    p.clock.advance(0.01)  # an entry created in the same clock tick as the invalidation is invalid
    assert user(1) == 2
    assert p.caches[1].sync.get_cached("u:1", lambda: -1) == 2


def test_tag_times_are_refetched_after_tag_refresh_without_a_bus() -> None:
    clock = FakeClock()
    store: dict[str, tuple[bytes, float]] = {}
    tag_times: dict[str, float] = {}
    a = TieredCache([MemoryTier(), FakeRemoteTier(store, tag_times=tag_times)], clock=clock, tag_refresh=1)
    b_remote = FakeRemoteTier(store, tag_times=tag_times)
    b = TieredCache([MemoryTier(), b_remote], clock=clock, tag_refresh=1)
    a.sync.set("k", "v", tags=["t"])
    assert b.sync.get("k") == "v"
    clock.advance(0.1)
    a.sync.invalidate_tags("t")  # no bus: b learns on its next refresh of the tag time
    assert b.sync.get("k") is None or b.sync.get("k") == "v"
    clock.advance(1.1)
    assert b.sync.get("k") is None


def test_tags_work_on_a_memory_only_cache() -> None:
    clock = FakeClock()
    cache = TieredCache([MemoryTier()], clock=clock)
    cache.sync.set("a", 1, tags=["t"])
    cache.sync.set("b", 2)
    clock.advance(0.01)
    cache.sync.invalidate_tags("t")
    assert cache.sync.get("a") is None and cache.sync.get("b") == 2


def test_an_entry_loaded_while_its_tag_was_invalidated_is_invalid() -> None:
    p = Peers(1)
    cache = p.caches[0]

    def loader() -> str:
        p.clock.advance(0.01)
        cache.sync.invalidate_tags("t")  # lands while the load runs
        p.clock.advance(0.01)
        return "old data"

    assert cache.sync.get_cached("k", loader, tags=["t"]) == "old data"
    assert cache.sync.get("k") is None


# --- expire ---------------------------------------------------------------------------------


def test_expire_marks_stale_everywhere_and_keeps_the_value_for_fail_safe() -> None:
    p = Peers(2, stale_ttl=300)
    a, b = (cache.sync for cache in p.caches)
    a.set("k", "v")
    b.get("k")
    a.expire("k")
    assert a.get("k") is None and b.get("k") is None  # not fresh anymore anywhere
    assert b.get("k", allow_stale=True) == "v"

    def down() -> str:
        raise ConnectionError("db down")

    assert b.get_cached("k", down) == "v"  # fail-safe
    assert a.get_cached("k", lambda: "new") == "v"  # the failure is throttled for every process
    p.clock.advance(6)
    assert a.get_cached("k", lambda: "new") == "new"


def test_expire_async_api() -> None:
    p = Peers(1, stale_ttl=60)
    cache = p.caches[0]

    async def main() -> None:
        await cache.set("k", 1, tags=["t"])
        await cache.expire("k")
        assert await cache.get("k") is None
        assert await cache.get("k", allow_stale=True) == 1
        p.clock.advance(0.01)
        await cache.invalidate_tags("t")
        assert await cache.get("k", allow_stale=True) is None
        await cache.set("j", 2)
        await cache.clear()
        assert await cache.get("j") is None

    asyncio.run(main())


# --- delete during a load ---------------------------------------------------------------------


def test_a_delete_during_a_load_wins_in_this_process() -> None:
    p = Peers(1)
    cache = p.caches[0].sync
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(5)
        return "loaded before the delete"

    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(cache.get_cached("k", slow)))
    worker.start()
    started.wait(5)
    cache.delete("k")
    release.set()
    worker.join(5)
    assert result == ["loaded before the delete"]  # the caller asked before the delete
    assert p.in_l1(0, "k") is None


def test_a_delete_in_another_process_during_a_load_wins_there_too() -> None:
    p = Peers(2)
    b = p.caches[1].sync
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(5)
        return "old"

    worker = threading.Thread(target=lambda: b.get_cached("k", slow))
    worker.start()
    started.wait(5)
    p.caches[0].sync.delete("k")
    release.set()
    worker.join(5)
    assert p.in_l1(1, "k") is None


@pytest.mark.parametrize("op", ["set", "delete", "expire", "invalidate_tags", "clear"])
def test_every_write_publishes_exactly_one_message(op: str) -> None:
    p = Peers(1)
    cache = p.caches[0].sync
    cache.set("k", 1, tags=["t"])
    before = len(p.buses[0].published)
    {
        "set": lambda: cache.set("k", 2),
        "delete": lambda: cache.delete("k"),
        "expire": lambda: cache.expire("k"),
        "invalidate_tags": lambda: cache.invalidate_tags("t"),
        "clear": cache.clear,
    }[op]()
    assert len(p.buses[0].published) == before + 1


def test_the_clear_floor_lapses_so_a_clearer_with_a_fast_clock_cannot_keep_l1_empty() -> None:
    import time

    from tiercache._entry import next_version

    l1 = MemoryTier()
    cache = TieredCache([l1, FakeRemoteTier()], namespace="app", ttl=60)
    cache._rt.coherence.floor_seconds = 0.05
    cache._rt.coherence.cleared(next_version() + 10**12)  # a clear stamped 1,000 s ahead
    cache.sync.set("k", "during")
    assert l1.get("app:k") is None and cache.sync.get("k") == "during"  # refused by L1, kept below
    time.sleep(0.06)
    cache.sync.set("k", "after")
    assert l1.get("app:k") is not None and l1.get("app:k").value == "after"  # type: ignore[union-attr]
