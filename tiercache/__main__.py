"""``python -m tiercache demo``: a small realistic scenario, printing where each call was served."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class User:
    id: int
    name: str


def _redis_answers(url: str) -> bool:
    try:
        import redis
    except ImportError:
        return False
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.3, socket_connect_timeout=0.3)
        ok = bool(client.ping())
        client.close()
        return ok
    except Exception:
        return False


def _embedded_redis() -> tuple[str, Callable[[], None]]:
    """A fakeredis server on a free loopback port (for machines without Redis)."""
    try:
        import fakeredis
    except ImportError:
        sys.exit("no Redis answers and fakeredis is not installed: pip install 'tiercache-py[demo]'")
    try:  # without Lua, fakeredis refuses RedisTier's leases and fenced writes: every read misses
        importlib.import_module("lupa")
    except ImportError:
        sys.exit("no Redis answers and fakeredis has no Lua support: pip install 'tiercache-py[demo]'")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = fakeredis.TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"redis://127.0.0.1:{port}/0", stop


async def _demo() -> None:
    from tiercache import TieredCache, tiered_cache
    from tiercache.adapters.memory import MemoryTier
    from tiercache.adapters.redis import RedisTier

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    stop: Callable[[], None] | None = None
    if _redis_answers(url):
        where = f"Redis at {url.split('@')[-1]}"
    else:
        url, stop = _embedded_redis()
        where = "an embedded fakeredis (no Redis answered; set REDIS_URL to use yours)"
    print(f"tiercache demo: memory (L1) -> {where} (L2) -> a slow 'database' loader (L3)\n")

    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    loads = 0

    async def database(user_id: int) -> User:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)  # a 50 ms query
        return User(user_id, f"user-{user_id}")

    def make_process() -> tuple[TieredCache, MemoryTier, Any]:
        l1 = MemoryTier(max_entries=1000)
        cache = TieredCache([l1, RedisTier(url=url)], ttl=60, namespace=namespace)

        @tiered_cache(cache, key="user:{user_id}")
        async def get_user(user_id: int) -> User:
            return await database(user_id)

        return cache, l1, get_user

    cache_a, l1_a, get_user_a = make_process()
    cache_b, l1_b, get_user_b = make_process()  # a second "process": own L1, same Redis
    rows: list[tuple[str, str, str, float]] = []

    async def call(label: str, who: str, fn: Any, l1: MemoryTier, user_id: int) -> None:
        before = loads
        in_l1 = l1.get(f"{namespace}:user:{user_id}") is not None
        started = time.perf_counter()
        value = await fn(user_id)
        elapsed = (time.perf_counter() - started) * 1000
        source = "loader (L3)" if loads > before else ("L1 memory" if in_l1 else "L2 redis")
        rows.append((label, who, source, elapsed))
        assert value == User(user_id, f"user-{user_id}")

    await call("first call: cold everywhere", "A", get_user_a, l1_a, 42)
    await call("same call again", "A", get_user_a, l1_a, 42)
    await call("another process, cold L1", "B", get_user_b, l1_b, 42)
    await call("that process again", "B", get_user_b, l1_b, 42)
    await get_user_a.invalidate(42)
    await call("after invalidate(42)", "A", get_user_a, l1_a, 42)

    before = loads
    started = time.perf_counter()
    await asyncio.gather(*(get_user_a(7) for _ in range(100)))
    rows.append(
        (
            "100 concurrent callers, cold key",
            "A",
            f"loader x{loads - before}",
            (time.perf_counter() - started) * 1000,
        )
    )

    width = max(len(r[0]) for r in rows)
    print(f"{'call':<{width}}  proc  {'served from':<12}  time")
    for label, who, source, ms in rows:
        print(f"{label:<{width}}  {who:<4}  {source:<12}  {ms:8.3f} ms")

    for cache in (cache_a, cache_b):
        await cache.delete("user:42")
        await cache.delete("user:7")
        await cache.aclose()
    if stop is not None:
        stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiercache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo scenario and print where each call was served")
    args = parser.parse_args(argv)
    if args.command == "demo":
        asyncio.run(_demo())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
