"""Django cache backends side by side: TieredCacheBackend (L1 hit, L2 hit, set, incr) against
Django's LocMemCache and RedisCache on the same Redis. Run: python benchmarks/django_backend.py

Prints microseconds per call (median of 5 rounds). Needs Redis on 127.0.0.1:6379.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable

import django
from django.conf import settings

URL = "redis://127.0.0.1:6379/0"


def per_call_us(fn: Callable[[], object], n: int = 2000, rounds: int = 5) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def main() -> None:
    ns = f"djbench{uuid.uuid4().hex[:8]}"
    settings.configure(
        SECRET_KEY="benchmark-secret-key-benchmark-secret-key",
        CACHES={
            "tier": {
                "BACKEND": "tiercache.contrib.django.TieredCacheBackend",
                "LOCATION": URL,
                "OPTIONS": {"NAMESPACE": ns},
            },
            "tier_no_l1": {
                "BACKEND": "tiercache.contrib.django.TieredCacheBackend",
                "LOCATION": URL,
                "OPTIONS": {"NAMESPACE": ns, "L1_MAX_TTL": 1e-9},
            },
            "redis": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": URL,
                "KEY_PREFIX": ns + "dj",
            },
            "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        },
    )
    django.setup()
    from django.core.cache import caches

    value = {"id": 42, "name": "Ada", "tags": ["a", "b"], "score": 3.5}
    rows = []
    for alias in ("tier", "tier_no_l1", "redis", "locmem"):
        c = caches[alias]
        c.set("k", value, 300)
        c.set("n", 0, 300)
        rows.append(
            (
                alias,
                per_call_us(lambda c=c: c.get("k")),
                per_call_us(lambda c=c: c.set("k", value, 300), n=500),
                per_call_us(lambda c=c: c.incr("n"), n=500),
            )
        )
    print(f"{'backend':12} {'get us':>9} {'set us':>9} {'incr us':>9}")
    for alias, g, s, i in rows:
        print(f"{alias:12} {g:9.1f} {s:9.1f} {i:9.1f}")
    caches["tier"].clear()
    caches["redis"].delete_many(["k", "n"])


if __name__ == "__main__":
    main()
