"""Checked by mypy --strict in CI (not collected by pytest): decorated functions keep their types."""

from __future__ import annotations

import asyncio
from typing import assert_type

from tiercache import TieredCache, tiered_cache, tiered_cache_many
from tiercache.adapters.memory import MemoryTier

cache = TieredCache([MemoryTier()], ttl=60)


@tiered_cache(cache, key="user:{user_id}")
def get_user(user_id: int, verbose: bool = False) -> dict[str, int]:
    return {"id": user_id}


@tiered_cache(cache, key="order:{order_id}")
async def get_order(order_id: str) -> list[str]:
    return [order_id]


@tiered_cache_many(cache, key="price:{}")
async def get_prices(ids: list[int]) -> dict[int, float]:
    return dict.fromkeys(ids, 1.0)


@tiered_cache_many(cache, key="name:{}", ttl="1h")
def get_names(ids: list[str]) -> dict[str, str]:
    return {i: i for i in ids}


async def main() -> None:
    assert_type(await get_prices([1, 2]), dict[int, float])
    assert_type(get_names(["a"]), dict[str, str])
    get_names([1])  # type: ignore[list-item]
    assert_type(get_user(1), dict[str, int])
    assert_type(get_user(1, verbose=True), dict[str, int])
    assert_type(await get_order("a"), list[str])
    get_user.invalidate(1)
    await get_order.invalidate("a")
    assert_type(get_user.uncached(2), dict[str, int])
    assert_type(get_user.cache_key(1), str)
    assert_type(await cache.get_cached("k", lambda: 3), int)

    async def load() -> float:
        return 1.0

    assert_type(await cache.get_cached("k", load), float)
    assert_type(cache.sync.get_cached("k", lambda: "s"), str)
    get_user("not an int")  # type: ignore[arg-type]
    await get_order(1)  # type: ignore[arg-type]


asyncio.run(main())
