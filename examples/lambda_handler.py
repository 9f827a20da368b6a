"""An AWS Lambda handler that runs ``asyncio.run`` on every invocation, with a module-level cache.

The cache (and its memory tier) outlives invocations in a warm container; each ``asyncio.run``
makes a new event loop, and the Redis tier keeps one client per loop, so the second invocation
works and is answered from L1. Configure with ``REDIS_URL`` (and ``CACHE_NAMESPACE``).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from tiercache import Tier, TieredCache
from tiercache.adapters.memory import MemoryTier

loads = {"count": 0}


def _make_cache() -> TieredCache:
    tiers: list[Tier] = [MemoryTier(max_entries=1_000)]
    url = os.environ.get("REDIS_URL")
    if url:
        from tiercache.adapters.redis import RedisTier

        tiers.append(RedisTier(url=url))
    return TieredCache(tiers, ttl=60, stale_ttl=600, namespace=os.environ.get("CACHE_NAMESPACE", "lambda"))


cache = _make_cache()  # created once per container, at cold start


async def _exchange_rate(currency: str) -> dict[str, Any]:
    loads["count"] += 1
    await asyncio.sleep(0.01)  # the upstream API call
    return {"currency": currency, "rate": 1.08 if currency == "USD" else 0.86}


async def _handle(event: dict[str, Any]) -> dict[str, Any]:
    currency = event.get("queryStringParameters", {}).get("currency", "USD")
    found = await cache.lookup(f"rate:{currency}", lambda: _exchange_rate(currency), ttl=60)
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json", "x-cache": found.source},
        "body": json.dumps(found.value),
    }


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point: a fresh event loop per invocation."""
    return asyncio.run(_handle(event))
