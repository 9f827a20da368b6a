"""One process of the multi-process stampede test: N concurrent callers of one cold key.

Usage: python -m tests.integration.stampede_worker URL NAMESPACE KEY CALLERS LOAD_SECONDS
Prints ``ready``, waits for a line on stdin (the go signal), then prints one JSON line with the
loader calls made in this process, the values the callers got and any errors.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier


async def main(url: str, namespace: str, key: str, callers: int, load_seconds: float) -> dict[str, object]:
    cache = TieredCache([MemoryTier(), RedisTier(url=url)], ttl=60, namespace=namespace)
    loads = 0

    async def loader() -> str:
        nonlocal loads
        loads += 1
        await asyncio.sleep(load_seconds)
        return f"value-from-{id(cache)}"

    await cache.get("warm-up-key")  # connect before the race, as a long-running server would be
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    started = time.monotonic()
    results = await asyncio.gather(
        *(cache.get_cached(key, loader) for _ in range(callers)), return_exceptions=True
    )
    elapsed = time.monotonic() - started
    await cache.aclose()
    return {
        "loads": loads,
        "values": sorted({r for r in results if isinstance(r, str)}),
        "errors": [repr(r) for r in results if isinstance(r, BaseException)],
        "elapsed": elapsed,
    }


if __name__ == "__main__":
    url, namespace, key, callers, load_seconds = sys.argv[1:6]
    out = asyncio.run(main(url, namespace, key, int(callers), float(load_seconds)))
    print(json.dumps(out), flush=True)
