"""L2 (Redis) hit cost: RedisTier.aget and get_cached (no L1) beside a raw redis.asyncio GET + orjson.loads.

Run: .venv/bin/python -m pytest benchmarks/bench_redis.py --benchmark-enable -s
Needs the shared Redis on 127.0.0.1:6379 (keys under a unique prefix, deleted afterwards).
``test_ratio`` interleaves the three in one loop and prints the ratios (target: <= 1.15x raw).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio

from tiercache import TieredCache
from tiercache.adapters.redis import RedisTier

URL = "redis://127.0.0.1:6379/0"
BATCH = 200  # awaits per timed call, so the event-loop entry cost is amortised
VALUE = {"id": 42, "name": "Ada Lovelace", "email": "ada@example.com", "roles": ["admin", "user"], "n": 3.5}


class Setup:
    """One event loop, a cache with only the Redis tier, a raw client, and the same value in both."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.prefix = "tcbench-" + uuid.uuid4().hex[:8]
        self.tier = RedisTier(url=URL, prefix=self.prefix)
        self.cache = TieredCache([self.tier], ttl=600, namespace="bench")
        self.raw = redis.asyncio.Redis.from_url(URL, protocol=2)
        self.raw_key = f"{self.prefix}:raw"
        self.loop.run_until_complete(self._fill())

    async def _fill(self) -> None:
        await self.cache.set("user", VALUE)
        record = await self.raw.get(self.tier._vkey("bench:user"))
        assert record is not None
        await self.raw.set(self.raw_key, record[24:], ex=600)  # the same envelope, plain

    async def raw_get(self) -> Any:
        data = await self.raw.get(self.raw_key)
        assert isinstance(data, bytes)
        return orjson.loads(data)

    async def tier_get(self) -> Any:
        return await self.tier.aget("bench:user")

    async def cached_get(self) -> Any:
        return await self.cache.get_cached("user", _never)

    def batch(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], None]:
        async def many() -> None:
            for _ in range(BATCH):
                await fn()

        return lambda: self.loop.run_until_complete(many())

    def close(self) -> None:
        async def shutdown() -> None:
            await self.raw.delete(self.raw_key, self.tier._vkey("bench:user"))
            await self.raw.aclose()
            await self.cache.aclose()

        self.loop.run_until_complete(shutdown())
        self.tier.close()
        self.loop.close()


def _never() -> Any:
    raise AssertionError("the loader must not run: the value is in Redis")


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    s = Setup()
    yield s
    s.close()


@pytest.mark.benchmark(group="redis-l2-hit")
def test_raw_redis_get_orjson(benchmark: Any, setup: Setup) -> None:
    benchmark.pedantic(setup.batch(setup.raw_get), rounds=30, warmup_rounds=3)


@pytest.mark.benchmark(group="redis-l2-hit")
def test_tier_aget(benchmark: Any, setup: Setup) -> None:
    benchmark.pedantic(setup.batch(setup.tier_get), rounds=30, warmup_rounds=3)


@pytest.mark.benchmark(group="redis-l2-hit")
def test_get_cached_without_l1(benchmark: Any, setup: Setup) -> None:
    benchmark.pedantic(setup.batch(setup.cached_get), rounds=30, warmup_rounds=3)


def test_ratio(setup: Setup) -> None:
    """Interleaved rounds of the three (so drift hits all alike); prints median µs per hit."""
    runs: dict[str, list[float]] = {"raw": [], "tier.aget": [], "get_cached": []}
    fns = {"raw": setup.raw_get, "tier.aget": setup.tier_get, "get_cached": setup.cached_get}
    for fn in fns.values():  # warm up
        setup.batch(fn)()
    for _ in range(25):
        for name, fn in fns.items():
            call = setup.batch(fn)
            started = time.perf_counter()
            call()
            runs[name].append((time.perf_counter() - started) / BATCH * 1e6)
    med = {name: statistics.median(v) for name, v in runs.items()}
    print()
    for name, us in med.items():
        print(f"  {name:11s} {us:7.1f} µs/hit   {us / med['raw']:.3f}x raw")
    assert med["tier.aget"] / med["raw"] < 1.5  # loose, against noise; the target 1.15x is reported
