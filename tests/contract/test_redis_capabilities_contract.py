"""The optional coherence capabilities (ExpiringTier, NamespaceClearingTier, TagStore) as a contract.

``CapabilityContract`` is written tier-agnostically, like ``tiercache.testing.TierContract`` (it
could move there); here it runs against RedisTier on the shared server and on a real Cluster.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.redis_servers import RedisClusterProcesses, purge_prefix
from tiercache._entry import next_version
from tiercache._serde import JsonCodec
from tiercache._tier import ExpiringTier, NamespaceClearingTier, TagStore, TierBinding
from tiercache.adapters.redis import RedisTier
from tiercache.testing import FakeClock, make_entry

pytestmark = pytest.mark.redis


class CapabilityContract:
    """Subclass and provide ``make_tier`` (a zero-argument factory of tiers sharing storage)."""

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def namespace(self) -> str:
        return f"cap{uuid.uuid4().hex[:10]}"

    @pytest.fixture
    def tier(self, make_tier: Callable[[], Any], clock: FakeClock, namespace: str) -> Iterator[Any]:
        tier = make_tier()
        tier.bind(TierBinding(clock=clock, codec=JsonCodec(), namespace=namespace))
        yield tier
        tier.close()

    def test_tier_offers_the_capabilities(self, tier: Any) -> None:
        capable: object = tier
        assert isinstance(capable, ExpiringTier)
        assert isinstance(capable, NamespaceClearingTier)
        assert isinstance(capable, TagStore)

    # --- ExpiringTier ---------------------------------------------------------------------------

    def test_expire_marks_stale_and_keeps_the_value_for_fail_safe(
        self, tier: Any, clock: FakeClock, namespace: str
    ) -> None:
        key = f"{namespace}:k"
        entry = make_entry(key, "v", clock(), ttl=60, stale_ttl=60)
        tier.set(key, entry)
        version = next_version()
        tier.expire(key, clock(), version)
        got = tier.get(key)
        assert got is not None and got.value == "v"
        assert got.fresh_until == clock() and got.stale_until == entry.stale_until
        assert got.version == version and not got.is_fresh(clock())
        clock.advance(61)  # still there while stale
        assert tier.get(key) is not None

    def test_expire_never_extends_and_fences_older_writes(
        self, tier: Any, clock: FakeClock, namespace: str
    ) -> None:
        key = f"{namespace}:k"
        entry = make_entry(key, "v", clock(), ttl=10)
        tier.set(key, entry)
        tier.expire(key, clock() + 100, next_version())
        assert tier.get(key).fresh_until == entry.fresh_until
        tier.set(key, make_entry(key, "late", clock(), version=entry.version + 1))
        assert tier.get(key).value == "v"  # older than the expire: refused

    def test_expire_of_a_missing_key_stores_nothing(
        self, tier: Any, clock: FakeClock, namespace: str
    ) -> None:
        tier.expire(f"{namespace}:none", clock(), next_version())
        assert tier.get(f"{namespace}:none") is None

    def test_async_expire(self, tier: Any, clock: FakeClock, namespace: str) -> None:
        key = f"{namespace}:k"
        tier.set(key, make_entry(key, 1, clock()))
        asyncio.run(tier.aexpire(key, clock() - 1, next_version()))
        assert not tier.get(key).is_fresh(clock())

    # --- NamespaceClearingTier ----------------------------------------------------------------------

    def test_clear_removes_exactly_the_prefix(self, tier: Any, clock: FakeClock, namespace: str) -> None:
        mine = [f"{namespace}:{i}" for i in range(20)] + [f"{namespace}:" + "x" * 1000, f"{namespace}:a}}b"]
        others = [f"{namespace}x:1", f"{namespace}x:" + "x" * 1000, f"{namespace}x:a}}b"]
        for k in mine + others:
            tier.set(k, make_entry(k, k, clock()))
        assert tier.clear(f"{namespace}:") == len(mine)
        assert all(tier.get(k) is None for k in mine)
        assert all(tier.get(k) is not None for k in others)
        assert asyncio.run(tier.aclear(f"{namespace}x:")) == len(others)
        assert tier.clear(f"{namespace}:") == 0

    # --- TagStore -----------------------------------------------------------------------------------

    def test_tag_times_keep_the_maximum(self, tier: Any) -> None:
        tier.set_tag_times(["a", "b"], 100.5)
        tier.set_tag_times(["a"], 50.0)
        tier.set_tag_times(["b"], 200.25)
        assert tier.get_tag_times(["a", "b", "unknown"]) == [100.5, 200.25, None]

    def test_tag_times_are_scoped_by_namespace(
        self, tier: Any, make_tier: Callable[[], Any], clock: FakeClock, namespace: str
    ) -> None:
        other = make_tier()
        other.bind(TierBinding(clock=clock, codec=JsonCodec(), namespace=namespace + "-other"))
        try:
            tier.set_tag_times(["a"], 1.0)
            assert other.get_tag_times(["a"]) == [None]
            asyncio.run(other.aset_tag_times(["a"], 2.0))
            assert asyncio.run(tier.aget_tag_times(["a"])) == [1.0]
        finally:
            other.close()


def _factory(url: str, prefix: str) -> Iterator[Callable[[], RedisTier]]:
    made: list[RedisTier] = []

    def build() -> RedisTier:
        made.append(RedisTier(socket_timeout=0.5, connect_timeout=0.5, url=url, prefix=prefix))
        return made[-1]

    yield build
    for t in made:
        t.close()
    purge_prefix(url, prefix)


class TestRedisCapabilitiesStandalone(CapabilityContract):
    @pytest.fixture
    def make_tier(self, shared_redis_url: str, redis_prefix: str) -> Iterator[Callable[[], RedisTier]]:
        yield from _factory(shared_redis_url, redis_prefix)


class TestRedisCapabilitiesCluster(CapabilityContract):
    @pytest.fixture
    def make_tier(
        self, redis_cluster: RedisClusterProcesses, redis_prefix: str
    ) -> Iterator[Callable[[], RedisTier]]:
        yield from _factory(redis_cluster.url, redis_prefix)
