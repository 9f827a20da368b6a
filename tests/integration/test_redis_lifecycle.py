"""Issue 12's lifecycle defects on real Redis: a lease SET NX that timed out on our side but ran on
the server later (a hung Redis that comes back, paused with SIGSTOP and resumed with SIGCONT) must
not leave a lease nobody holds; a load Redis's set-if-newer refused must not stay in L1."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis

from tests.redis_servers import RedisServer
from tiercache._tier import TierBinding
from tiercache.adapters.redis import RedisTier

pytestmark = pytest.mark.redis


def _tier(server: RedisServer) -> RedisTier:
    tier = RedisTier(url=server.url, socket_timeout=0.2, connect_timeout=0.5, prefix="lt")
    tier.bind(TierBinding(namespace="lt"))
    return tier


def _pause(server: RedisServer, seconds: float) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    time.sleep(seconds)


def _resume(server: RedisServer) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGCONT)


def _lease_gone(server: RedisServer, tier: RedisTier, key: str, within: float) -> bool:
    raw = redis.Redis.from_url(server.url)
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not raw.exists(tier._vkey(key) + ":lease"):
                return True
            time.sleep(0.05)
        return False
    finally:
        raw.close()


def test_a_timed_out_sync_lease_acquire_leaves_no_lease(redis_server: RedisServer) -> None:
    tier = _tier(redis_server)
    tier.get("lt:warm")  # a pooled connection, so the SET is sent at once
    _pause(redis_server, 0.0)
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever the client raises on a timeout
            tier.acquire_lease("lt:k", 10.0)
        time.sleep(0.3)
    finally:
        _resume(redis_server)
    assert _lease_gone(redis_server, tier, "lt:k", within=3.0)
    other = _tier(redis_server)  # another process can take the lease again at once
    assert other.acquire_lease("lt:k", 10.0) is not None
    tier.close()
    other.close()


def test_a_timed_out_async_lease_acquire_leaves_no_lease(redis_server: RedisServer) -> None:
    tier = _tier(redis_server)

    async def main() -> None:
        await tier.aget("lt:warm")
        _pause(redis_server, 0.0)
        try:
            with pytest.raises(Exception):  # noqa: B017
                await tier.aacquire_lease("lt:k", 10.0)
            await asyncio.sleep(0.3)
        finally:
            _resume(redis_server)
        deadline = time.monotonic() + 3.0
        raw = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            while await raw.exists(tier._vkey("lt:k") + ":lease") and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert not await raw.exists(tier._vkey("lt:k") + ":lease")
        finally:
            await raw.aclose()
        await tier.aclose()

    asyncio.run(main())


def test_l1_does_not_keep_a_load_redis_refused(shared_redis_url: str, redis_prefix: str) -> None:
    """Issue 12, defect 5, on real Redis: without a bus, a load that another process's newer
    ``set`` overtook is refused by the set-if-newer script, and our L1 must not keep it either."""
    from tests.redis_servers import purge_prefix
    from tiercache import TieredCache
    from tiercache.adapters.memory import MemoryTier

    def cache() -> TieredCache:
        tier = RedisTier(url=shared_redis_url, prefix=redis_prefix, socket_timeout=0.5, connect_timeout=0.5)
        return TieredCache([MemoryTier(), tier], ttl=60, namespace="refused")

    ours, other = cache(), cache()
    try:

        def load() -> str:
            other.sync.set("k", "newer")  # lands in Redis while our load runs
            return "late"

        assert ours.sync.get_cached("k", load) == "late"  # the caller still gets its own load
        assert ours.sync.get("k") == "newer"  # but neither Redis nor our L1 keeps it

        async def main() -> None:
            async def aload() -> str:
                await other.set("k2", "newer")
                return "late"

            assert await ours.get_cached("k2", aload) == "late"
            assert await ours.get("k2") == "newer"

        asyncio.run(main())
    finally:
        purge_prefix(shared_redis_url, redis_prefix)
