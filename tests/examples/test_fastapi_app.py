"""examples/fastapi_app.py through FastAPI's TestClient, on memory + the shared Redis."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from fastapi.testclient import TestClient


def test_cached_handlers(load_example: Callable[[str], ModuleType], namespace: str) -> None:
    ex = load_example("fastapi_app")
    with TestClient(ex.app) as client:
        first = client.get("/products/1")
        assert first.status_code == 200
        assert first.json() == {"id": 1, "name": "Kettle", "price": "24.90"}
        assert client.get("/products/1").json() == first.json()
        assert ex.db_queries["count"] == 1  # the second request was a cache hit

        assert client.get("/debug/products/1").json()["source"] == "L1"
        ex.cache.tiers[0].clear()  # as if another process: the value comes from Redis, typed
        explained = client.get("/debug/products/1").json()
        assert explained["source"] == "L2" and explained["value"]["price"] == "24.90"
        assert ex.db_queries["count"] == 1

        assert client.get("/products/9").status_code == 404
        assert client.get("/products/9").status_code == 404
        assert ex.db_queries["count"] == 2  # None was cached

        changed = client.put("/products/1/price", params={"price": "19.90"})
        assert changed.json()["price"] == "19.90"
        assert ex.db_queries["count"] == 3

        text = client.get("/metrics").text
        assert f'tiercache_loads_total{{namespace="{namespace}"}}' in text
        assert f'tiercache_tier_hits_total{{level="2",namespace="{namespace}",tier="redis"}} 1.0' in text
