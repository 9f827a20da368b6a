"""Cost of an HTTP cache hit (tiercache.contrib.starlette) beside an undecorated FastAPI endpoint.

Both endpoints return the same small JSON document; requests are made in-process through the ASGI
interface (no sockets), so the figure is the framework's and the cache's own time per request.
The cache is memory-only: a hit never reaches a lower tier (tests/integration/test_http_cache.py
counts the Redis commands of hits: none). Run: ``python benchmarks/bench_http_cache.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import fastapi

from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.contrib.starlette import HttpCache


def build() -> tuple[Any, TieredCache]:
    cache = TieredCache([MemoryTier()], namespace="bench")
    http_cache = HttpCache(cache)
    app = fastapi.FastAPI()
    http_cache.install(app)

    @app.get("/plain/{i}")
    async def plain(i: int) -> dict[str, Any]:
        return {"i": i, "items": list(range(20))}

    @app.get("/cached/{i}")
    @http_cache.cached(max_age=60)
    async def cached(i: int) -> dict[str, Any]:
        return {"i": i, "items": list(range(20))}

    return app, cache


async def call(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def batch_us(app: Any, path: str, headers: list[tuple[bytes, bytes]], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await call(app, path, headers)
    return (time.perf_counter() - start) / n * 1e6


async def main(rounds: int = 15, n: int = 1000) -> None:
    """Batches of the three cases alternate (so load from other processes hits them alike); the
    fastest batch of each is reported, the least disturbed measurement of its cost."""
    app, cache = build()
    assert await call(app, "/cached/1", []) == 200
    cases = {
        "undecorated endpoint": ("/plain/1", []),
        "cache hit (200)": ("/cached/1", []),
        "cache hit (304)": ("/cached/1", [(b"if-none-match", b"*")]),
    }
    for path, headers in cases.values():
        await batch_us(app, path, headers, 300)  # warm-up
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, (path, headers) in cases.items():
            best[name] = min(best[name], await batch_us(app, path, headers, n))
    base = best["undecorated endpoint"]
    for name, us in best.items():
        print(f"{name:21s}: {us:7.1f} us/request  ({us / base:.2f}x)")
    await cache.aclose()


if __name__ == "__main__":
    asyncio.run(main())
