"""A burst of concurrent misses through L1 + L2 (default settings) beside raw cache-aside, same run.

Run: ``python benchmarks/burst.py [--rounds 9] [--burst 1000] [--load-ms 1]`` (needs ``redis-server``
on the PATH; a private server is started on a free loopback port). Each round takes ``--burst``
fresh keys and misses them all at once (``asyncio.gather``) through ``TieredCache([MemoryTier(),
RedisTier(url)])`` built with the defaults, then does the same with raw cache-aside (redis.asyncio
``GET``, the same loader, ``SET``) on a pool of the same size (32 connections, waiting for a free
one). The loader's cost is fixed: ``await asyncio.sleep(load_ms)``. Rounds alternate which side
goes first, so drift on a noisy machine hits both alike.

Reported: values loaded and values stored in Redis (read back with one ``MGET``), tier errors and
breaker openings from ``cache.stats``, and the time per miss as a ratio to raw cache-aside (the
median over rounds of the per-round ratio). ``tests/integration/test_redis_burst.py`` runs a
smaller burst as a test; the acceptance line is: everything stored, 0 tier errors, <= 1.5x.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers as peers
import orjson
import redis.asyncio

from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier

VALUE = {"id": 42, "name": "Ada Lovelace", "email": "ada@example.com", "roles": ["admin", "user"], "n": 3.5}


@dataclass
class Round:
    seconds: float
    loaded: int
    stored: int
    errors: int = 0
    breaker_opened: int = 0


async def tiercache_round(url: str, burst: int, load_s: float) -> Round:
    """One burst of misses through a freshly built cache (defaults), then count what Redis holds."""
    prefix = "burst-" + uuid.uuid4().hex[:8]
    tier = RedisTier(url, prefix=prefix)
    cache = TieredCache([MemoryTier(), tier], ttl=600, namespace="b")
    loads = 0

    async def loader(i: int) -> dict[str, Any]:
        nonlocal loads
        await asyncio.sleep(load_s)
        loads += 1
        return {**VALUE, "id": i}

    async def one(i: int) -> Any:
        return await cache.get_cached(f"k{i}", lambda: loader(i))

    await tier.aget("b:warm")  # one connection up, as the raw side's client is after its first call
    started = time.perf_counter()
    values = await asyncio.gather(*(one(i) for i in range(burst)))
    seconds = time.perf_counter() - started
    assert [v["id"] for v in values] == list(range(burst))
    raw = redis.asyncio.Redis.from_url(url, protocol=2)
    try:
        names = [tier._vkey(f"b:k{i}") for i in range(burst)]
        stored = sum(1 for d in await raw.mget(names) if d is not None)
        await raw.unlink(*names)
    finally:
        await raw.aclose()
    red = cache.stats.tiers[1]
    await cache.aclose()
    return Round(seconds, loads, stored, red.errors, red.breaker_opened)


async def raw_round(url: str, burst: int, load_s: float) -> Round:
    """The same burst as plain cache-aside: GET, load on a miss, SET; 32 connections, waiting."""
    prefix = "burst-raw-" + uuid.uuid4().hex[:8]
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=32, timeout=10, protocol=2)
    client = redis.asyncio.Redis.from_pool(pool)
    loads = 0

    async def one(i: int) -> Any:
        nonlocal loads
        key = f"{prefix}:k{i}"
        data = await client.get(key)
        if data is not None:
            return orjson.loads(data)
        await asyncio.sleep(load_s)
        loads += 1
        value = {**VALUE, "id": i}
        await client.set(key, orjson.dumps(value), ex=600)
        return value

    try:
        await client.get(f"{prefix}:warm")
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(burst)))
        seconds = time.perf_counter() - started
        names = [f"{prefix}:k{i}" for i in range(burst)]
        stored = sum(1 for d in await client.mget(names) if d is not None)
        await client.unlink(*names)
    finally:
        await client.aclose()
    return Round(seconds, loads, stored)


def run(url: str, rounds: int, burst: int, load_s: float) -> dict[str, Any]:
    """``rounds`` alternating pairs of bursts; returns the totals and the per-round ratios."""
    tc: list[Round] = []
    raw: list[Round] = []
    for r in range(rounds):
        order = [True, False] if r % 2 == 0 else [False, True]
        for ours in order:
            if ours:
                tc.append(asyncio.run(tiercache_round(url, burst, load_s)))
            else:
                raw.append(asyncio.run(raw_round(url, burst, load_s)))
    ratios = [t.seconds / b.seconds for t, b in zip(tc, raw, strict=True)]
    return {
        "rounds": rounds,
        "burst": burst,
        "load_ms": load_s * 1000,
        "loaded": sum(t.loaded for t in tc),
        "stored": sum(t.stored for t in tc),
        "tier_errors": sum(t.errors for t in tc),
        "breaker_opened": sum(t.breaker_opened for t in tc),
        "raw_loaded": sum(b.loaded for b in raw),
        "raw_stored": sum(b.stored for b in raw),
        "us_per_miss": statistics.median(t.seconds for t in tc) / burst * 1e6,
        "raw_us_per_miss": statistics.median(b.seconds for b in raw) / burst * 1e6,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--load-ms", type=float, default=1.0)
    args = parser.parse_args()
    with peers.own_redis() as server:
        result = run(server.url, args.rounds, args.burst, args.load_ms / 1000)
    r = result
    print(f"{r['rounds']} rounds of {r['burst']:,} concurrent misses, loader {r['load_ms']:g} ms (fixed)")
    print(f"  tiercache L1+L2 (defaults): loaded {r['loaded']:,}, stored {r['stored']:,}, ", end="")
    print(f"tier errors {r['tier_errors']}, breaker openings {r['breaker_opened']}")
    print(f"  raw cache-aside:            loaded {r['raw_loaded']:,}, stored {r['raw_stored']:,}")
    print(f"  time per miss: tiercache {r['us_per_miss']:.1f} µs, raw {r['raw_us_per_miss']:.1f} µs")
    print(f"  ratio (median of per-round ratios): {r['ratio']:.2f}x  rounds: ", end="")
    print(" ".join(f"{x:.2f}" for x in r["ratios"]))


if __name__ == "__main__":
    main()
