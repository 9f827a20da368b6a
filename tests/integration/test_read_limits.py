"""Remote tiers never decode a record over their read limit: a planted huge value is a counted
corrupt miss, not hundreds of MB per read."""

from __future__ import annotations

import uuid

import pytest
import redis

from tests.redis_servers import purge_prefix
from tiercache import TieredCache
from tiercache.adapters.redis import RedisTier
from tiercache.testing import FakeCloudflareKV

pytestmark = pytest.mark.redis


def test_redis_records_over_max_read_bytes_are_corrupt_misses(shared_redis_url: str) -> None:
    prefix = f"tctest-rl-{uuid.uuid4().hex[:8]}"
    writer = TieredCache([RedisTier(url=shared_redis_url, prefix=prefix)], namespace="rl")
    reader = TieredCache(
        [RedisTier(url=shared_redis_url, prefix=prefix, max_read_bytes=4096)], namespace="rl"
    )
    try:
        writer.sync.set("big", "x" * 100_000)
        writer.sync.set("small", "y")
        client = redis.Redis.from_url(shared_redis_url)
        assert len(client.get(client.keys(f"{prefix}*big*")[0]) or b"") > 100_000  # really stored
        client.close()
        assert reader.sync.get_cached("big", lambda: "reloaded") == "reloaded"
        assert reader.stats.tiers[0].corrupt >= 1
        assert reader.sync.get("small") == "y"
        assert reader._rt.tiers[0].max_value_bytes <= 4096  # type: ignore[attr-defined]
    finally:
        writer.sync.close()
        reader.sync.close()
        purge_prefix(shared_redis_url, prefix)


def test_kv_values_over_max_read_bytes_are_corrupt_misses() -> None:
    kv = FakeCloudflareKV()
    writer = TieredCache([kv.tier()], namespace="rl")
    reader = TieredCache([kv.tier(max_read_bytes=4096)], namespace="rl")
    writer.sync.set("big", "x" * 100_000)
    assert reader.sync.get_cached("big", lambda: "reloaded") == "reloaded"
    assert reader.stats.tiers[0].corrupt == 1
