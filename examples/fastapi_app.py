"""A FastAPI service with cached handlers: ``@tiered_cache`` on async functions, memory + Redis.

Run it::

    pip install 'tiercache-py[redis,prometheus]' fastapi uvicorn
    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.fastapi_app:app --workers 4

With ``REDIS_URL``, Redis is L2 and the invalidation bus (Redis pub/sub) makes a change in one
worker drop every other worker's L1 copy (``PUT /products/{id}/price``): no worker keeps serving
the old price until its TTL runs out. Without ``REDIS_URL`` the cache is memory only (run one
worker). ``GET /metrics`` serves the cache's counters in the Prometheus format;
``GET /debug/products/{id}`` says where a value came from.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

from fastapi import FastAPI, HTTPException, Response
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel

from tiercache import Tier, TieredCache, tiered_cache
from tiercache.adapters.memory import MemoryTier
from tiercache.prometheus import register


class Product(BaseModel):
    id: int
    name: str
    price: Decimal


# Stands in for the database; counts queries so the test can see what the cache saved.
PRODUCTS = {1: ("Kettle", Decimal("24.90")), 2: ("Teapot", Decimal("31.00"))}
db_queries = {"count": 0}


def make_cache() -> TieredCache:
    tiers: list[Tier] = [MemoryTier(max_entries=10_000)]
    bus = None
    url = os.environ.get("REDIS_URL")
    if url:
        from tiercache.adapters.redis import RedisTier
        from tiercache.adapters.redis_bus import RedisBus

        redis = RedisTier(url=url)
        tiers.append(redis)
        bus = RedisBus.for_tier(redis)  # other workers' L1 copies are dropped on every change
    namespace = os.environ.get("CACHE_NAMESPACE", "shop")
    return TieredCache(tiers, ttl=30, stale_ttl=300, namespace=namespace, bus=bus)


cache = make_cache()
registry = CollectorRegistry()
register(cache, registry)


@tiered_cache(cache, key="product:{product_id}", ttl=30)
async def get_product(product_id: int) -> Product | None:  # None is cached too (a known absence)
    db_queries["count"] += 1
    await asyncio.sleep(0.01)  # the query
    row = PRODUCTS.get(product_id)
    return None if row is None else Product(id=product_id, name=row[0], price=row[1])


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await cache.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/products/{product_id}")
async def read_product(product_id: int) -> Product:
    product = await get_product(product_id)
    if product is None:
        raise HTTPException(404, "no such product")
    return product


@app.put("/products/{product_id}/price")
async def change_price(product_id: int, price: Decimal) -> Product:
    name, _ = PRODUCTS[product_id]
    PRODUCTS[product_id] = (name, price)
    await get_product.invalidate(product_id)  # every tier, and other processes' L1 copies
    return await read_product(product_id)


@app.get("/debug/products/{product_id}")
async def explain_product(product_id: int) -> dict[str, object]:
    # The same key the decorator uses (its template), and the undecorated function as the loader.
    found = await cache.lookup(
        f"product:{product_id}", lambda: get_product.uncached(product_id), value_type=Product
    )
    return {"value": found.value, "source": found.source, "tier": found.tier}


@app.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")
