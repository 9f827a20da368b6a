"""tiercache.prometheus: the collector's samples after the scripted scenarios, read back from a
CollectorRegistry (and its text exposition)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from tiercache.prometheus import CACHE_COUNTERS, TIER_COUNTERS, TieredCacheCollector, register

from .scenario import World, breaker, miss_then_hit, new_world, run_all, stale_fail_safe


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def setup() -> tuple[World, CollectorRegistry, str]:
    w = new_world()
    registry = CollectorRegistry()
    register(w.cache, registry)
    return w, registry, w.cache.namespace


def test_hit_miss_and_load_counters() -> None:
    w, reg, ns = setup()
    miss_then_hit(w)
    l1 = {"namespace": ns, "tier": "memory", "level": "1"}
    l2 = {"namespace": ns, "tier": "remote", "level": "2"}
    assert sample(reg, "tiercache_tier_hits_total", **l1) == 2  # inline L1 hits included
    assert sample(reg, "tiercache_tier_misses_total", **l2) == 1
    assert sample(reg, "tiercache_tier_hits_total", **l2) == 0
    assert sample(reg, "tiercache_loads_total", namespace=ns) == 1
    seconds = sample(reg, "tiercache_load_seconds_total", namespace=ns)
    assert seconds is not None and seconds > 0


def test_stale_fail_safe_counters() -> None:
    w, reg, ns = setup()
    miss_then_hit(w)
    stale_fail_safe(w)
    assert sample(reg, "tiercache_tier_stale_hits_total", namespace=ns, tier="remote", level="2") == 1
    assert sample(reg, "tiercache_stale_served_total", namespace=ns) == 1
    assert sample(reg, "tiercache_load_errors_total", namespace=ns) == 1


def test_breaker_counters_and_gauge() -> None:
    w, reg, ns = setup()
    l2 = {"namespace": ns, "tier": "remote", "level": "2"}
    w.l2.down = True
    w.cache.sync.get_cached("b1", lambda: 1)
    assert sample(reg, "tiercache_tier_errors_total", **l2) == 2
    assert sample(reg, "tiercache_tier_breaker_opened_total", **l2) == 1
    assert sample(reg, "tiercache_tier_breaker_open", **l2) == 1
    w.cache.sync.get_cached("b2", lambda: 1)
    assert sample(reg, "tiercache_tier_skipped_total", **l2) == 2
    w.l2.down = False
    w.clock.advance(6)
    w.cache.sync.get_cached("b3", lambda: 1)
    assert sample(reg, "tiercache_tier_breaker_closed_total", **l2) == 1
    assert sample(reg, "tiercache_tier_breaker_open", **l2) == 0


def test_every_counter_is_exposed_and_matches_stats() -> None:
    w, reg, ns = setup()
    run_all(w)
    snap = w.cache.stats.snapshot()
    for index, row in enumerate(snap["tiers"]):
        labels = {"namespace": ns, "tier": row["name"], "level": str(index + 1)}
        for name, field, _ in TIER_COUNTERS:
            assert sample(reg, name + "_total", **labels) == row[field], name
    for name, field, _ in CACHE_COUNTERS:
        assert sample(reg, name + "_total", namespace=ns) == snap[field], name
    text = generate_latest(reg).decode()
    assert f'tiercache_tier_hits_total{{level="1",namespace="{ns}",tier="memory"}} 2.0' in text
    assert "# TYPE tiercache_tier_breaker_open gauge" in text


def test_caches_sharing_a_namespace_are_added_and_dropped_caches_disappear() -> None:
    a, b = new_world("shared"), new_world("shared")
    registry = CollectorRegistry()
    collector = TieredCacheCollector(a.cache, b.cache)
    registry.register(collector)
    a.cache.sync.get_cached("k", lambda: 1)
    b.cache.sync.get_cached("k", lambda: 1)
    assert sample(registry, "tiercache_loads_total", namespace="shared") == 2
    collector.remove(b.cache)
    assert sample(registry, "tiercache_loads_total", namespace="shared") == 1
    del a
    import gc

    gc.collect()
    assert sample(registry, "tiercache_loads_total", namespace="shared") is None


def test_breaker_scenario_through_registry() -> None:
    w, reg, ns = setup()
    breaker(w)
    assert sample(reg, "tiercache_loads_total", namespace=ns) == 4
