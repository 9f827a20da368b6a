"""tiercache.testing's Redis stand-in: a real RedisTier over fakeredis, with fault injection."""

from __future__ import annotations

import asyncio

from tiercache import EventKind, TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeRedisServer


def test_fake_redis_server_backs_a_real_redis_tier_and_can_fail() -> None:
    with FakeRedisServer() as redis:
        events: list[str] = []
        cache = TieredCache(
            [MemoryTier(), redis.tier(socket_timeout=0.5)],
            namespace="fk",
            on_event=lambda e: events.append(e.kind),
        )
        other = TieredCache([MemoryTier(), redis.tier(socket_timeout=0.5)], namespace="fk")
        cache.sync.set("k", {"v": 1})
        assert other.sync.get("k") == {"v": 1}  # through the fake server
        redis.down()
        assert cache.sync.get_cached("cold", lambda: "loaded") == "loaded"  # no exception
        assert EventKind.TIER_ERROR in events
        redis.up()
        assert asyncio.run(other.get_cached("cold2", lambda: 2)) == 2
        assert cache.sync.get("cold2") == 2
        cache.sync.close()
        other.sync.close()
