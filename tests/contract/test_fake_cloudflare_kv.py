"""``tiercache.testing.FakeCloudflareKV``: the in-process KV fake users get, held to the tier
contract, and its fault injection seen through CloudflareKVTier inside a TieredCache."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from tiercache import EventKind, TieredCache
from tiercache._events import Event
from tiercache.adapters._kv_protocol import KVRateLimited
from tiercache.adapters.cloudflare_kv import CloudflareKVTier
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeCloudflareKV, TierContract


@pytest.fixture(scope="module")
def shared_fake() -> Iterator[FakeCloudflareKV]:
    fake = FakeCloudflareKV(write_interval=0.1)
    yield fake
    assert fake.stats.write_rate_violations == 0 and fake.stats.retry_after_violations == 0


class TestFakeCloudflareKV(TierContract):
    shared_storage = True
    keeps_tombstones = True

    @pytest.fixture
    def make_tier(self, shared_fake: FakeCloudflareKV) -> Callable[[], CloudflareKVTier]:
        return lambda: shared_fake.tier(write_interval=0.3)


def chain(fake: FakeCloudflareKV, events: list[Event]) -> TieredCache:
    kv = fake.tier(retries=0, timeout=0.2, deadline=0.5)
    return TieredCache([MemoryTier(max_entries=10), kv], namespace="fk", ttl=120, on_event=events.append)


def test_values_land_in_the_fake_under_the_tier_s_names() -> None:
    fake = FakeCloudflareKV()
    cache = chain(fake, [])
    cache.sync.set("user:1", {"name": "Ada"})
    assert len(fake.store) == 1 and b"Ada" in next(iter(fake.store.values())).value
    assert [r.method for r in fake.records] == ["PUT"]
    cache.sync.close()


@pytest.mark.parametrize("kind", ["500", "timeout"])
def test_injected_failures_degrade_to_a_load_not_an_error(kind: str) -> None:
    fake = FakeCloudflareKV()
    events: list[Event] = []
    cache = chain(fake, events)
    fake.fail_next(1, kind)
    assert cache.sync.get_cached("k", lambda: "loaded") == "loaded"
    assert fake.stats.faults[kind] == 1
    assert [e.tier for e in events if e.kind == EventKind.TIER_ERROR] == ["kv"]
    cache.sync.close()


def test_injected_429_makes_the_tier_wait_out_retry_after() -> None:
    fake = FakeCloudflareKV()
    kv = fake.tier()
    fake.fail_next(1, "429")
    with pytest.raises(KVRateLimited):
        asyncio.run(kv.aget("fk:k"))
    sent = fake.stats.requests
    with pytest.raises(KVRateLimited, match="wait"):
        kv.get("fk:k")  # refused locally while Retry-After (1 s) runs
    assert fake.stats.requests == sent
    kv.close()


def test_down_fails_every_call_until_it_is_up_again() -> None:
    fake = FakeCloudflareKV()
    events: list[Event] = []
    cache = chain(fake, events)
    fake.down = True
    assert cache.sync.get_cached("a", lambda: 1) == 1
    fake.down = False
    assert cache.sync.get_cached("b", lambda: 2) == 2
    assert sum(e.kind == EventKind.TIER_ERROR for e in events) >= 1
    assert fake.live_value("fk:b") is not None  # written once the fake was back
    cache.sync.close()


def test_fail_next_rejects_an_unknown_fault() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        FakeCloudflareKV().fail_next(1, "503")
