"""get_many_cached and auto-batching: one pass per tier, one loader call, joins and partial results."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import pytest

from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier


def chain(**kw: Any) -> tuple[TieredCache, MemoryTier, FakeRemoteTier, FakeClock]:
    clock = FakeClock()
    l1, l2 = MemoryTier(), FakeRemoteTier()
    return TieredCache([l1, l2], clock=clock, namespace="b", ttl=60, **kw), l1, l2, clock


class Loader:
    def __init__(self, missing: tuple[str, ...] = ()) -> None:
        self.calls: list[list[str]] = []
        self.missing = missing

    def __call__(self, keys: list[str]) -> dict[str, str]:
        self.calls.append(list(keys))
        return {k: f"v-{k}" for k in keys if k not in self.missing}


def test_all_in_l1_touches_nothing_else() -> None:
    cache, _, l2, _ = chain()
    for k in "abc":
        cache.sync.set(k, f"v-{k}")
    load = Loader()
    before = dict(l2.calls)
    assert cache.sync.get_many_cached(["a", "b", "c"], load) == {k: f"v-{k}" for k in "abc"}
    assert load.calls == [] and l2.calls == before


def test_all_in_l2_is_one_round_trip_and_backfills_l1() -> None:
    cache, l1, l2, clock = chain()
    keys = [f"k{i}" for i in range(100)]
    for k in keys:
        cache.sync.set(k, f"v-{k}", ttl=60)
    l1.clear()
    clock.advance(20)
    load = Loader()
    before = l2.calls["get_many"], l2.calls["get"]
    assert cache.sync.get_many_cached(keys, load) == {k: f"v-{k}" for k in keys}
    assert (l2.calls["get_many"], l2.calls["get"]) == (before[0] + 1, before[1])
    assert load.calls == []
    copy = l1.get("b:k7")
    assert copy is not None and copy.fresh_until == pytest.approx(clock() + 40)  # remaining life only


def test_half_in_l1_half_missing_is_one_read_and_one_loader_call() -> None:
    cache, _, l2, _ = chain()
    keys = [f"k{i}" for i in range(100)]
    for k in keys[:50]:
        cache.sync.set(k, f"v-{k}")
    load = Loader()
    before = l2.calls["get_many"]
    result = cache.sync.get_many_cached(keys, load)
    assert result == {k: f"v-{k}" for k in keys}
    assert l2.calls["get_many"] == before + 1
    assert load.calls == [keys[50:]]
    assert l2.calls["set_many"] >= 1
    assert cache.sync.get("k99") == "v-k99"


def test_keys_the_loader_does_not_return_are_misses_not_errors() -> None:
    cache, *_ = chain()
    load = Loader(missing=("b",))
    assert cache.sync.get_many_cached(["a", "b", "c"], load) == {"a": "v-a", "c": "v-c"}
    assert cache.sync.get("b", "absent") == "absent"
    assert cache.sync.get_many_cached(["b"], Loader()) == {"b": "v-b"}  # retried next time


def test_duplicates_are_folded_and_order_kept() -> None:
    cache, *_ = chain()
    load = Loader()
    assert list(cache.sync.get_many_cached(["b", "a", "b"], load)) == ["b", "a"]
    assert load.calls == [["b", "a"]]


def test_loader_error_serves_stale_where_it_can_and_raises_otherwise() -> None:
    cache, _, _, clock = chain(stale_ttl=300)
    cache.sync.set("old", "stale-value", ttl=1)
    clock.advance(2)

    def broken(keys: list[str]) -> dict[str, str]:
        raise ConnectionError("db down")

    assert cache.sync.get_many_cached(["old"], broken) == {"old": "stale-value"}
    with pytest.raises(ConnectionError):
        cache.sync.get_many_cached(["old", "new"], broken)


def test_a_single_key_flight_in_progress_is_joined_not_reloaded() -> None:
    cache, *_ = chain()
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(5)
        return "from the single-key loader"

    worker = threading.Thread(target=lambda: cache.sync.get_cached("a", slow))
    worker.start()
    started.wait(5)
    load = Loader()
    threading.Timer(0.05, release.set).start()
    result = cache.sync.get_many_cached(["a", "b"], load)
    worker.join(5)
    assert result == {"a": "from the single-key loader", "b": "v-b"}
    assert load.calls == [["b"]]


def test_async_get_many_with_an_async_loader() -> None:
    cache, *_ = chain()
    calls: list[list[str]] = []

    async def load(keys: list[str]) -> dict[str, int]:
        calls.append(keys)
        await asyncio.sleep(0.01)
        return {k: len(k) for k in keys}

    async def main() -> None:
        assert await cache.get_many_cached(["a", "bb"], load) == {"a": 1, "bb": 2}
        assert await cache.get_many_cached(["a", "bb", "ccc"], load) == {"a": 1, "bb": 2, "ccc": 3}

    asyncio.run(main())
    assert calls == [["a", "bb"], ["ccc"]]


def test_a_loader_returning_a_non_mapping_is_a_clear_error() -> None:
    cache, *_ = chain()
    with pytest.raises(TypeError, match="mapping"):
        cache.sync.get_many_cached(["a"], lambda keys: ["not", "a", "mapping"])  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError):
        cache.sync.get_many_cached("abc", Loader())


# --- auto-batching ----------------------------------------------------------------------------


class NetworkLikeRemote(FakeRemoteTier):
    """A remote tier whose reads take a little while, as a network round trip does."""

    async def aget(self, key: str) -> Any:
        await asyncio.sleep(0.002)
        return self.get(key)

    async def aget_many(self, keys: Any) -> list[Any]:
        await asyncio.sleep(0.002)
        return self.get_many(keys)


def test_a_burst_of_remote_reads_costs_one_get_and_one_multi_key_read() -> None:
    remote = NetworkLikeRemote()
    writer = TieredCache([FakeRemoteTier(remote.store)], namespace="b")
    for i in range(200):
        writer.sync.set(f"k{i}", i)
    cache = TieredCache([MemoryTier(), remote], namespace="b")

    async def main() -> list[Any]:
        return await asyncio.gather(*(cache.get_cached(f"k{i}", lambda: -1) for i in range(200)))

    assert asyncio.run(main()) == list(range(200))
    assert remote.calls["get"] == 1  # the first read went straight out ...
    assert remote.calls["get_many"] == 1  # ... the 199 that came while it was in flight: one MGET


def test_sequential_reads_are_never_delayed_for_batching() -> None:
    remote = NetworkLikeRemote()
    cache = TieredCache([MemoryTier(), remote], namespace="b")

    async def main() -> None:
        for i in range(5):
            await cache.get(f"k{i}")

    asyncio.run(main())
    assert remote.calls["get"] == 5 and remote.calls["get_many"] == 0


def test_auto_batching_can_be_turned_off() -> None:
    remote = NetworkLikeRemote()
    cache = TieredCache([MemoryTier(), remote], namespace="b", auto_batch=False)

    async def main() -> None:
        await asyncio.gather(*(cache.get_cached(f"k{i}", lambda: 1) for i in range(10)))

    asyncio.run(main())
    assert remote.calls["get"] == 10 and remote.calls["get_many"] == 0


def test_a_cancelled_batch_opener_does_not_strand_the_others() -> None:
    class SlowRemote(FakeRemoteTier):
        async def aget_many(self, keys: Any) -> list[Any]:
            await asyncio.sleep(0.05)
            return self.get_many(keys)

        async def aget(self, key: str) -> Any:
            await asyncio.sleep(0.05)
            return self.get(key)

    remote = SlowRemote()
    TieredCache([FakeRemoteTier(remote.store)], namespace="b").sync.set("k1", "one")
    cache = TieredCache([MemoryTier(), remote], namespace="b")

    async def main() -> None:
        opener = asyncio.ensure_future(cache.get_cached("k0", lambda: "zero"))
        others = [asyncio.ensure_future(cache.get_cached("k1", lambda: "loaded")) for _ in range(3)]
        await asyncio.sleep(0.01)
        opener.cancel()
        started = time.monotonic()
        assert await asyncio.gather(*others) == ["one"] * 3
        assert time.monotonic() - started < 2

    asyncio.run(main())


@dataclasses.dataclass
class User:
    id: int


def test_tiered_cache_many_decorator_sync_and_async() -> None:
    from tiercache import tiered_cache_many

    remote = FakeRemoteTier()
    cache = TieredCache([MemoryTier(), remote], namespace="m")
    calls: list[list[int]] = []

    @tiered_cache_many(cache, key="user:{}")
    def users(ids: list[int]) -> dict[int, User]:
        calls.append(ids)
        return {i: User(i) for i in ids if i != 404}

    assert users([1, 2]) == {1: User(1), 2: User(2)}
    assert users([2, 3, 404]) == {2: User(2), 3: User(3)}
    assert calls == [[1, 2], [3, 404]]
    other = TieredCache([MemoryTier(), FakeRemoteTier(remote.store)], namespace="m")

    @tiered_cache_many(other, key="user:{}")
    async def ausers(ids: list[int]) -> dict[int, User]:
        raise AssertionError("everything is in the shared tier")

    got = asyncio.run(ausers([1, 2, 3]))
    assert got == {1: User(1), 2: User(2), 3: User(3)} and isinstance(got[1], User)
    with pytest.raises(ValueError):
        tiered_cache_many(cache, key="user:{id}")
