"""A separate process using TieredCacheBackend (for the cross-process tests in test_backend.py).

    python -m tests.contrib_django.worker <json config> <op> [args...]

Prints one JSON line with its results. Needs no Django settings (explicit SIGNING_KEYS).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    from tiercache.contrib.django import TieredCacheBackend

    config, op, args = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
    cache = TieredCacheBackend(config["LOCATION"], config)
    start = float(args[0]) if args else 0.0
    while time.time() < start:  # line the workers up so their calls overlap
        time.sleep(0.001)
    if op == "add":  # try to add race:0..n-1; report which ones this process won
        n = int(args[1])
        print(json.dumps([i for i in range(n) if cache.add(f"race:{i}", "winner")]))
    elif op == "incr":  # n increments of "counter"
        n = int(args[1])
        print(json.dumps([cache.incr("counter") for _ in range(n)]))
    elif op == "get_or_set":  # n threads ask for "expensive"; the slow default counts its calls
        import threading

        import redis

        counter = redis.Redis.from_url(config["LOCATION"])
        results: list[object] = []

        def expensive() -> str:
            counter.incr(args[1])
            time.sleep(0.3)
            return f"computed by {os.getpid()}"

        def ask() -> None:
            results.append(cache.get_or_set("expensive", expensive, 60))

        threads = [threading.Thread(target=ask) for _ in range(int(args[2]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counter.close()
        print(json.dumps(results))
    elif op == "set":
        cache.set(args[1], json.loads(args[2]))
        print(json.dumps("ok"))
    elif op == "incr1":
        print(json.dumps(cache.incr(args[1])))
    else:
        raise SystemExit(f"unknown op {op}")
    cache.tiered.sync.close()


if __name__ == "__main__":
    main()
