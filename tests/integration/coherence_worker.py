"""One process of the multi-process coherence tests: a memory → Redis cache with a RedisBus.

Usage: python -m tests.integration.coherence_worker URL PREFIX NAMESPACE [nobus | bus@BUS_URL]
(``nobus``: no invalidation bus, to show that the history checker catches stale L1 reads;
``bus@BUS_URL``: the bus on its own connection to BUS_URL, e.g. through a fault proxy.)
Prints ``ready`` once its bus is subscribed, then answers one JSON command per stdin line with one
JSON line on stdout. Times are ``time.monotonic()`` (one clock for every process on the machine).

Commands:
  {"op": "set", "key": k, "value": v, "tags": [...]}   → {"t": time the call returned}
  {"op": "delete" | "expire", "key": k}                → {"t": ...}
  {"op": "tags", "tags": [...]}                        → {"t": ...} (invalidate_tags)
  {"op": "get", "key": k}                              → {"value": ..., "l1": bool}
  {"op": "watch", "key": k, "old": v, "timeout": s}    → prints {"watching": true} at once, then
        polls get(k) every ~0.2 ms until it returns something else: {"t": when, "value": ...}
  {"op": "history", "keys": [...], "seconds": s, "seed": n}
        → random set/delete/get on ``keys`` for ``s`` seconds; {"ops": [[kind, key, value,
        start, end], ...]} (values are unique strings; a get records what it returned)
  {"op": "quit"}
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisBus, RedisTier


def main(url: str, prefix: str, namespace: str, mode: str = "bus") -> None:
    l1 = MemoryTier()
    l2 = RedisTier(url=url, prefix=prefix, socket_timeout=0.25)
    if mode.startswith("bus@"):
        bus: RedisBus | None = RedisBus(url=mode[4:], socket_timeout=0.25, connect_timeout=0.25)
    else:
        bus = RedisBus.for_tier(l2) if mode == "bus" else None
    cache = TieredCache([l1, l2], ttl=60, namespace=namespace, bus=bus).sync
    cache.get("warm-up")  # connects, and starts the bus (the core subscribes on first use)
    if bus is not None and not bus.wait_ready(5):
        print(json.dumps({"error": "bus did not subscribe"}), flush=True)
        return
    print("ready", flush=True)
    me = f"{namespace}-{id(cache)}-{random.random()}"
    counter = 0
    for line in sys.stdin:
        cmd: dict[str, Any] = json.loads(line)
        op = cmd["op"]
        out: dict[str, Any] = {}
        if op == "set":
            cache.set(cmd["key"], cmd["value"], tags=tuple(cmd.get("tags", ())))
            out["t"] = time.monotonic()
        elif op == "delete":
            cache.delete(cmd["key"])
            out["t"] = time.monotonic()
        elif op == "expire":
            cache.expire(cmd["key"])
            out["t"] = time.monotonic()
        elif op == "tags":
            cache.invalidate_tags(*cmd["tags"])
            out["t"] = time.monotonic()
        elif op == "get":
            full = f"{namespace}:{cmd['key']}"
            out["l1"] = l1.get(full) is not None
            out["value"] = cache.get(cmd["key"])
        elif op == "watch":
            print(json.dumps({"watching": True}), flush=True)
            deadline = time.monotonic() + cmd["timeout"]
            value = cache.get(cmd["key"])
            while value == cmd["old"] and time.monotonic() < deadline:
                time.sleep(0.0002)
                value = cache.get(cmd["key"])
            out = {"t": time.monotonic(), "value": value}
        elif op == "history":
            rng = random.Random(cmd["seed"])
            ops: list[list[Any]] = []
            stop = time.monotonic() + cmd["seconds"]
            while time.monotonic() < stop:
                key = rng.choice(cmd["keys"])
                roll = rng.random()
                start = time.monotonic()
                if roll < 0.3:
                    counter += 1
                    value = f"{me}-{counter}"
                    cache.set(key, value)
                    ops.append(["set", key, value, start, time.monotonic()])
                elif roll < 0.4:
                    cache.delete(key)
                    ops.append(["delete", key, None, start, time.monotonic()])
                else:
                    got = cache.get(key)
                    ops.append(["get", key, got, start, time.monotonic()])
                time.sleep(rng.uniform(0, 0.002))
            out["ops"] = ops
        elif op == "quit":
            break
        print(json.dumps(out), flush=True)
    cache.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
