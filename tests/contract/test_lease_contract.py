"""The lease contract, beside the tier contract: the in-memory fake and RedisTier on real Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.redis_servers import purge_prefix
from tiercache.adapters.redis import RedisTier
from tiercache.testing import FakeRemoteTier, LeaseContract


class TestFakeRemoteTierLeases(LeaseContract):
    waits = False  # one process: wait_for_entry answers at once

    @pytest.fixture
    def make_tier(self) -> Callable[[], FakeRemoteTier]:
        store: dict[str, tuple[bytes, float]] = {}
        table: dict[str, tuple[str, float]] = {}
        return lambda: FakeRemoteTier(store, leases=True, lease_table=table)


@pytest.mark.redis
class TestRedisTierLeases(LeaseContract):
    @pytest.fixture
    def make_tier(self, shared_redis_url: str, redis_prefix: str) -> Iterator[Callable[[], RedisTier]]:
        yield lambda: RedisTier(
            url=shared_redis_url, prefix=redis_prefix, socket_timeout=0.5, connect_timeout=0.5
        )
        purge_prefix(shared_redis_url, redis_prefix)
