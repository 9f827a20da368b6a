"""A Flask (sync) app: ``@tiered_cache`` on plain functions, and the blocking ``cache.sync`` API.

Run it::

    pip install 'tiercache-py[redis]' flask
    REDIS_URL=redis://127.0.0.1:6379/0 gunicorn --workers 4 examples.flask_app:app

With ``REDIS_URL``, Redis is L2 and the invalidation bus (Redis pub/sub) tells every other worker
to drop its L1 copy when one worker changes a value (``PUT /flags/<name>``, a report's refresh).
Without it the cache is memory only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import date

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from tiercache import Tier, TieredCache, tiered_cache
from tiercache.adapters.memory import MemoryTier

reports_built = {"count": 0}


@dataclass
class Report:
    day: date
    region: str
    orders: int


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
    namespace = os.environ.get("CACHE_NAMESPACE", "reports")
    return TieredCache(tiers, ttl=300, stale_ttl=3600, namespace=namespace, bus=bus)


cache = make_cache()


@tiered_cache(cache, ttl=300)  # key: module.qualname + a stable hash of (day, region)
def daily_report(day: date, region: str = "eu") -> Report:
    reports_built["count"] += 1
    time.sleep(0.01)  # the expensive query
    return Report(day=day, region=region, orders=day.day * 10 + len(region))


app = Flask(__name__)


@app.get("/reports/<region>/<day>")
def report(region: str, day: str) -> ResponseReturnValue:
    r = daily_report(date.fromisoformat(day), region)  # a Report again, even when read from Redis
    return jsonify(day=r.day.isoformat(), region=r.region, orders=r.orders)


@app.post("/reports/<region>/<day>/refresh")
def refresh(region: str, day: str) -> ResponseReturnValue:
    daily_report.invalidate(date.fromisoformat(day), region)  # sync function: a plain call
    return report(region, day)


@app.get("/flags/<name>")
def flag(name: str) -> ResponseReturnValue:
    found = cache.sync.lookup(f"flag:{name}", lambda: name.startswith("beta"), ttl="1h")
    return jsonify(enabled=found.value, source=found.source)


@app.put("/flags/<name>")
def set_flag(name: str) -> ResponseReturnValue:
    enabled = request.args.get("enabled") == "true"
    cache.sync.set(f"flag:{name}", enabled, ttl="1h")  # every tier; every other worker drops its L1 copy
    return jsonify(enabled=enabled)
