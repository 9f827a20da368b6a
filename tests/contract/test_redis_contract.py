"""RedisTier against the tier contract, on the shared standalone Redis and on a real 3-master Cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.redis_servers import RedisClusterProcesses, purge_prefix
from tiercache.adapters.redis import RedisTier
from tiercache.testing import TierContract

pytestmark = pytest.mark.redis


def _factory(make: Callable[[], RedisTier], url: str, prefix: str) -> Iterator[Callable[[], RedisTier]]:
    """Builds tiers for one test; afterwards closes them and deletes the test's keys."""
    made: list[RedisTier] = []

    def build() -> RedisTier:
        tier = make()
        made.append(tier)
        return tier

    yield build
    for tier in made:
        tier.close()
    purge_prefix(url, prefix)


class TestRedisTierStandalone(TierContract):
    shared_storage = True
    keeps_tombstones = True

    @pytest.fixture
    def make_tier(self, shared_redis_url: str, redis_prefix: str) -> Iterator[Callable[[], RedisTier]]:
        yield from _factory(
            lambda: RedisTier(
                socket_timeout=0.5, connect_timeout=0.5, url=shared_redis_url, prefix=redis_prefix
            ),
            shared_redis_url,
            redis_prefix,
        )


class TestRedisTierStandaloneWithMaxTTL(TierContract):
    shared_storage = True
    keeps_tombstones = True

    @pytest.fixture
    def make_tier(self, shared_redis_url: str, redis_prefix: str) -> Iterator[Callable[[], RedisTier]]:
        yield from _factory(
            lambda: RedisTier(
                socket_timeout=0.5, connect_timeout=0.5, url=shared_redis_url, prefix=redis_prefix, max_ttl=30
            ),
            shared_redis_url,
            redis_prefix,
        )


class TestRedisTierCluster(TierContract):
    shared_storage = True
    keeps_tombstones = True

    @pytest.fixture
    def make_tier(
        self, redis_cluster: RedisClusterProcesses, redis_prefix: str
    ) -> Iterator[Callable[[], RedisTier]]:
        yield from _factory(
            lambda: RedisTier(
                socket_timeout=0.5, connect_timeout=0.5, url=redis_cluster.url, prefix=redis_prefix
            ),
            redis_cluster.url,
            redis_prefix,
        )
