"""L1 hit through the decorator, sync and async, beside baselines measured in the same run.

Targets (issue 2): sync decorator hit <= 0.5x cachetools.cached(TTLCache); async decorator hit
<= 4x a bare ``await`` of a trivial coroutine.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from cachetools import TTLCache, cached

from tiercache import TieredCache, tiered_cache
from tiercache.adapters.memory import MemoryTier

BATCH = 1000  # calls per measured round: amortises the timer and, for async, the loop entry


def plain(user_id: int) -> int:
    return user_id


def make_cache(metrics: bool = True) -> TieredCache:
    return TieredCache([MemoryTier(max_entries=10_000)], ttl=3600, namespace="bench", metrics=metrics)


def _sync_rounds(fn: Any) -> Any:
    fn(42)

    def batch() -> None:
        for _ in range(BATCH):
            fn(42)

    return batch


def test_sync_plain_call(measure: Any) -> None:
    measure(_sync_rounds(plain), group="sync-hit", per_call=BATCH)


def test_sync_cachetools_ttlcache(measure: Any) -> None:
    fn = cached(TTLCache(maxsize=10_000, ttl=3600))(plain)
    measure(_sync_rounds(fn), group="sync-hit", baseline=True, per_call=BATCH)


def test_sync_functools_lru_cache(measure: Any) -> None:
    fn = functools.lru_cache(maxsize=10_000)(plain)
    measure(_sync_rounds(fn), group="sync-hit", per_call=BATCH)


def test_sync_tiercache_template_key(measure: Any) -> None:
    fn = tiered_cache(make_cache(), key="user:{user_id}")(plain)
    measure(_sync_rounds(fn), group="sync-hit", per_call=BATCH)


def test_metrics_off_sync_template_key(measure: Any) -> None:
    fn = tiered_cache(make_cache(metrics=False), key="user:{user_id}")(plain)
    measure(_sync_rounds(fn), group="metrics-sync", baseline=True, per_call=BATCH)


def test_metrics_on_sync_template_key(measure: Any) -> None:
    fn = tiered_cache(make_cache(metrics=True), key="user:{user_id}")(plain)
    measure(_sync_rounds(fn), group="metrics-sync", per_call=BATCH)


def test_metrics_off_async_template_key(measure: Any) -> None:
    fn = tiered_cache(make_cache(metrics=False), key="user:{user_id}")(trivial)
    measure(_async_rounds(fn), group="metrics-async", baseline=True, per_call=BATCH)


def test_metrics_on_async_template_key(measure: Any) -> None:
    fn = tiered_cache(make_cache(metrics=True), key="user:{user_id}")(trivial)
    measure(_async_rounds(fn), group="metrics-async", per_call=BATCH)


def test_sync_tiercache_default_key(measure: Any) -> None:
    fn = tiered_cache(make_cache())(plain)
    measure(_sync_rounds(fn), group="sync-hit", per_call=BATCH)


def test_sync_tiercache_get_cached(measure: Any) -> None:
    cache = make_cache()
    measure(
        _sync_rounds(lambda user_id: cache.sync.get_cached("user:42", lambda: user_id)),
        group="sync-hit",
        per_call=BATCH,
    )


async def trivial(user_id: int) -> int:
    return user_id


def _async_rounds(fn: Any) -> Any:
    loop = asyncio.new_event_loop()

    async def batch() -> None:
        for _ in range(BATCH):
            await fn(42)

    loop.run_until_complete(batch())
    return lambda: loop.run_until_complete(batch())


def test_async_bare_await(measure: Any) -> None:
    measure(_async_rounds(trivial), group="async-hit", baseline=True, per_call=BATCH)


def test_async_tiercache_template_key(measure: Any) -> None:
    fn = tiered_cache(make_cache(), key="user:{user_id}")(trivial)
    measure(_async_rounds(fn), group="async-hit", per_call=BATCH)


def test_async_tiercache_get_cached(measure: Any) -> None:
    cache = make_cache()

    async def call(user_id: int) -> int:
        return await cache.get_cached("user:42", lambda: user_id)  # type: ignore[no-any-return]

    measure(_async_rounds(call), group="async-hit", per_call=BATCH)
