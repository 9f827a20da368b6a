"""A Prometheus collector exposing the counters of one or more TieredCaches (``cache.stats``).

Install with ``pip install 'tiercache-py[prometheus]'``::

    from prometheus_client import REGISTRY
    from tiercache.prometheus import TieredCacheCollector

    REGISTRY.register(TieredCacheCollector(cache))

Values are read from ``cache.stats`` at scrape time: nothing is added to the hit path. Per-tier
series are labelled ``namespace``, ``tier`` and ``level`` (1 for the first tier); cache-wide ones
``namespace``. Caches sharing a namespace are added together.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry

    from ._cache import TieredCache

__all__ = ["TIER_COUNTERS", "CACHE_COUNTERS", "TieredCacheCollector", "register"]

#: Per-tier counters: (metric name without ``_total``, ``TierStats`` field, help text).
TIER_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("tiercache_tier_hits", "hits", "Fresh entries found in the tier (inline L1 hits included)"),
    ("tiercache_tier_stale_hits", "stale_hits", "Stale entries found in the tier"),
    ("tiercache_tier_misses", "misses", "Reads the tier answered with nothing usable"),
    ("tiercache_tier_backfills", "backfills", "Entries copied up into the tier"),
    ("tiercache_tier_errors", "errors", "Calls to the tier that failed (timeouts, connection errors...)"),
    ("tiercache_tier_skipped", "skipped", "Calls not made because the tier's circuit breaker was open"),
    ("tiercache_tier_corrupt", "corrupt", "Reads that found bytes that are not a valid entry for the key"),
    ("tiercache_tier_breaker_opened", "breaker_opened", "Times the tier's circuit breaker opened"),
    ("tiercache_tier_breaker_closed", "breaker_closed", "Times the tier's circuit breaker closed again"),
)

#: Cache-wide counters: (metric name without ``_total``, ``CacheStats`` field, help text).
CACHE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("tiercache_loads", "loads", "Loader calls that returned a value"),
    ("tiercache_load_errors", "load_errors", "Loader calls that raised"),
    ("tiercache_load_seconds", "load_seconds", "Seconds spent in loaders"),
    ("tiercache_joins", "joins", "Callers that joined an in-process flight instead of loading"),
    ("tiercache_stale_served", "stale_served", "Stale values returned (stale-while-revalidate or fail-safe)"),
    ("tiercache_lease_waits", "lease_waits", "Waits for another process's load of the same key"),
    (
        "tiercache_lease_wait_seconds",
        "lease_wait_seconds",
        "Seconds spent waiting for other processes' loads",
    ),
    ("tiercache_bus_messages", "bus_messages", "Invalidation messages applied from other processes"),
    ("tiercache_bus_gaps", "bus_gaps", "Lost invalidation messages (L1 was cleared for the namespace)"),
)

_TIER_LABELS = ["namespace", "tier", "level"]


def _import_prometheus() -> Any:
    try:
        from prometheus_client import core
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "tiercache.prometheus needs prometheus_client: pip install 'tiercache-py[prometheus]'"
        ) from exc
    return core


class TieredCacheCollector:
    """Collects the counters of the caches given (and of those ``add``-ed later) at scrape time.

    Caches are held weakly: a cache that is garbage-collected stops being reported.
    """

    def __init__(self, *caches: TieredCache) -> None:
        self._core = _import_prometheus()
        self._caches: weakref.WeakSet[TieredCache] = weakref.WeakSet(caches)
        self._lock = threading.Lock()

    def add(self, cache: TieredCache) -> None:
        """Report ``cache`` too."""
        with self._lock:
            self._caches.add(cache)

    def remove(self, cache: TieredCache) -> None:
        """Stop reporting ``cache``."""
        with self._lock:
            self._caches.discard(cache)

    def describe(self) -> Iterable[Metric]:
        """The metric families (without samples), so a registry can check names on ``register``."""
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        """The current value of every counter (called by the registry on each scrape)."""
        with self._lock:
            caches = list(self._caches)
        return list(self._families(caches))

    def _families(self, caches: Iterable[TieredCache] = ()) -> Iterator[Metric]:
        core = self._core
        caches = list(caches)
        tier_rows: list[tuple[list[str], dict[str, Any]]] = []
        for cache in caches:
            stats = cache.stats
            for index, tier in enumerate(stats.tiers):
                row = dict(vars(tier))
                row["hits"] = stats.tier_hits(index)
                tier_rows.append(([cache.namespace, tier.name, str(index + 1)], row))

        for name, field, doc in TIER_COUNTERS:
            family = core.CounterMetricFamily(name, doc, labels=_TIER_LABELS)
            for labels, value in _sum_by_labels((labels, row[field]) for labels, row in tier_rows):
                family.add_metric(labels, value)
            yield family

        gauge = core.GaugeMetricFamily(
            "tiercache_tier_breaker_open",
            "1 while the tier's circuit breaker is open (or probing the tier again), else 0",
            labels=_TIER_LABELS,
        )
        for labels, value in _sum_by_labels(
            (labels, 1 if row["breaker_opened"] > row["breaker_closed"] else 0) for labels, row in tier_rows
        ):
            gauge.add_metric(labels, value)
        yield gauge

        for name, field, doc in CACHE_COUNTERS:
            family = core.CounterMetricFamily(name, doc, labels=["namespace"])
            for labels, value in _sum_by_labels(([c.namespace], getattr(c.stats, field)) for c in caches):
                family.add_metric(labels, value)
            yield family


def _sum_by_labels(points: Iterable[tuple[list[str], float]]) -> list[tuple[list[str], float]]:
    totals: dict[tuple[str, ...], float] = {}
    for labels, value in points:
        key = tuple(labels)
        totals[key] = totals.get(key, 0) + value
    return [(list(k), v) for k, v in totals.items()]


def register(cache: TieredCache, registry: CollectorRegistry | None = None) -> TieredCacheCollector:
    """Register a collector for ``cache`` with ``registry`` (default: prometheus_client's global
    ``REGISTRY``) and return it (``registry.unregister(collector)`` removes it)."""
    _import_prometheus()
    from prometheus_client import REGISTRY

    collector = TieredCacheCollector(cache)
    (registry if registry is not None else REGISTRY).register(collector)
    return collector
