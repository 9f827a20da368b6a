"""What a newcomer reads off a cache: one miss per cold load (so the documented PromQL hit ratio is
right), a readable ``repr(cache.stats)``, log lines without a doubled prefix, ``lookup()`` naming
a throttled fail-safe value, and a clear error for a cache used after it was closed."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.redis_servers import purge_prefix
from tiercache import CacheClosedError, TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier
from tiercache.prometheus import TieredCacheCollector
from tiercache.testing import FakeClock, FakeRemoteTier

from .scenario import new_world, run_all

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_chain(shared_redis_url: str, redis_prefix: str) -> Iterator[tuple[TieredCache, TieredCache]]:
    """Two "processes" (own L1) on the shared Redis, one namespace."""
    namespace = "obs" + uuid.uuid4().hex[:10]
    caches = [
        TieredCache([MemoryTier(), RedisTier(url=shared_redis_url, prefix=redis_prefix)], namespace=namespace)
        for _ in range(2)
    ]
    yield caches[0], caches[1]
    for cache in caches:
        cache.sync.close()
    purge_prefix(shared_redis_url, redis_prefix)


def l2_hit_ratio(registry: CollectorRegistry, namespace: str) -> float:
    """The L2 hit ratio as docs/operations.md computes it (from the counters, without rate())."""
    labels = {"namespace": namespace, "tier": "redis", "level": "2"}
    hits = registry.get_sample_value("tiercache_tier_hits_total", labels) or 0.0
    misses = registry.get_sample_value("tiercache_tier_misses_total", labels) or 0.0
    return hits / (hits + misses)


@pytest.mark.redis
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_one_cold_load_is_one_l2_miss(redis_chain: tuple[TieredCache, TieredCache], use_async: bool) -> None:
    a, b = redis_chain
    registry = CollectorRegistry()
    registry.register(TieredCacheCollector(a, b))  # two processes scraped, summed by namespace
    if use_async:

        async def calls() -> None:
            assert await a.get_cached("k", lambda: "v") == "v"  # cold: L2 miss, lease, load
            assert await b.get_cached("k", lambda: "x") == "v"  # the other process: L2 hit

        asyncio.run(calls())
    else:
        assert a.sync.get_cached("k", lambda: "v") == "v"
        assert b.sync.get_cached("k", lambda: "x") == "v"
    assert (a.stats.tiers[1].misses, a.stats.loads) == (1, 1)
    assert (b.stats.tier_hits(1), b.stats.tiers[1].misses) == (1, 0)
    assert l2_hit_ratio(registry, a.namespace) == 0.5  # one read answered of two


def test_stats_repr_shows_counters() -> None:
    w = new_world()
    run_all(w)
    text = repr(w.cache.stats)
    assert "bound method" not in text and "own_hits" not in text
    snap = w.cache.stats.snapshot()
    l1 = snap["tiers"][0]
    assert f"memory(L1): hits={l1['hits']} stale_hits={l1['stale_hits']} misses={l1['misses']}" in text
    assert f"loads={snap['loads']}" in text and "breaker_opened=1" in text


def test_log_lines_carry_the_logger_name_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tiercache")
    run_all(new_world())  # a tier failing, its breaker opening and closing: logged
    assert caplog.records
    for record in caplog.records:
        line = f"{record.name}: {record.getMessage()}"
        assert not record.getMessage().startswith("tiercache"), line
    # and in the source, for messages no scenario reaches
    call = re.compile(r"logger\.(?:debug|info|warning|error|exception|log)\((?:\s*\w+,)?\s*f?\"tiercache\b")
    for folder in ("tiercache", "adapters"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not call.search(path.read_text()), f"{path}: a log message repeats the logger name"


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_lookup_names_a_throttled_fail_safe_value(use_async: bool) -> None:
    clock = FakeClock()
    cache = TieredCache(
        [MemoryTier(), FakeRemoteTier()], clock=clock, ttl=10, stale_ttl=100, fail_safe_throttle=5
    )

    def failing() -> str:
        raise RuntimeError("database down")

    def lookup(loader: Callable[[], str]) -> tuple[object, str]:
        got = asyncio.run(cache.lookup("k", loader)) if use_async else cache.sync.lookup("k", loader)
        return got.value, got.source

    assert lookup(lambda: "v") == ("v", "LOADED")
    clock.advance(20)  # stale
    assert lookup(failing) == ("v", "STALE_FAILSAFE")
    clock.advance(1)  # within the retry throttle: served from L1 without calling the loader...
    assert lookup(failing) == ("v", "STALE_FAILSAFE")  # ...but it is still the fail-safe value
    clock.advance(5)  # throttle over, the loader recovered: a real value again
    assert lookup(lambda: "new") == ("new", "LOADED")
    assert lookup(failing) == ("new", "L1")


@pytest.mark.redis
def test_a_closed_cache_says_so_instead_of_reconnecting(redis_chain: tuple[TieredCache, TieredCache]) -> None:
    a, b = redis_chain

    async def scenario() -> None:
        assert await a.get_cached("k", lambda: 1) == 1
        await a.aclose()
        for _ in range(2):  # no flight or lease left behind by the first refusal
            with pytest.raises(CacheClosedError, match=r"closed \(aclose\(\) or sync.close\(\)\)"):
                await a.get_cached("other", lambda: 2)
        with pytest.raises(CacheClosedError):
            await a.set("k", 3)
        with pytest.raises(CacheClosedError):
            await a.delete("k")

    asyncio.run(scenario())
    b.sync.close()
    with pytest.raises(CacheClosedError):
        b.sync.get_cached("k2", lambda: 1)
