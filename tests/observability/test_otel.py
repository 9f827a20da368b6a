"""tiercache.otel: metric values and spans after scripted scenarios, through the SDK's in-memory
reader and exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tiercache import EventKind
from tiercache.otel import ATTRIBUTES, instrument

from .scenario import World, breaker, load_fails, load_ok, miss_then_hit, new_world, run_all, stale_fail_safe


class Telemetry:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.exporter))

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def value(self, name: str, **attrs: Any) -> float:
        """The sum of the points of ``name`` whose attributes include ``attrs``."""
        want = {f"tiercache.{k}": v for k, v in attrs.items()}
        return float(
            sum(p.value for p in self.points(name) if all(p.attributes.get(k) == v for k, v in want.items()))
        )

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]


@pytest.fixture
def tel() -> Iterator[Telemetry]:
    t = Telemetry()
    yield t
    t.meters.shutdown()
    t.tracers.shutdown()


@pytest.fixture
def world(tel: Telemetry) -> World:
    w = new_world()
    instrument(w.cache, tel.meters, tel.tracers)
    return w


def test_hit_and_miss_counters(tel: Telemetry, world: World) -> None:
    miss_then_hit(world)
    ns = world.cache.namespace
    # Inline L1 hits raise no event: they come from cache.stats through an observable counter.
    assert tel.value("tiercache.tier.lookups", namespace=ns, tier="memory", level=1, outcome="hit") == 2
    assert tel.value("tiercache.tier.lookups", tier="remote", level=2, outcome="miss") == 1
    assert tel.value("tiercache.tier.lookups", tier="remote", outcome="hit") == 0
    assert tel.value("tiercache.loads", namespace=ns, outcome="success") == 1
    assert tel.value("tiercache.loads", outcome="error") == 0
    (load,) = tel.points("tiercache.load.duration")
    assert load.count == 1 and dict(load.attributes) == {
        "tiercache.namespace": ns,
        "tiercache.outcome": "success",
    }


def test_l2_hit_backfill_and_stale_fail_safe(tel: Telemetry, world: World) -> None:
    miss_then_hit(world)
    world.l1.clear()
    assert world.cache.sync.lookup("a", load_ok).source == "L2"
    assert tel.value("tiercache.tier.lookups", tier="remote", outcome="hit") == 1
    assert tel.value("tiercache.tier.backfills", tier="memory", level=1) == 1
    stale_fail_safe(world)
    assert tel.value("tiercache.tier.lookups", tier="remote", outcome="stale") == 1
    assert tel.value("tiercache.stale_served") == 1
    assert tel.value("tiercache.loads", outcome="error") == 1


def test_failed_load_duration_async(tel: Telemetry, world: World) -> None:
    # The sync driver reports no duration with a loader error (see the report to the lead); the
    # async one does, and the histogram records it under outcome="error".
    async def scenario() -> None:
        await world.cache.get_cached("a", load_ok)
        world.clock.advance(20)
        assert (await world.cache.lookup("a", load_fails)).source == "STALE_FAILSAFE"

    asyncio.run(scenario())
    errors = [
        p for p in tel.points("tiercache.load.duration") if p.attributes["tiercache.outcome"] == "error"
    ]
    assert len(errors) == 1 and errors[0].count == 1


def test_breaker_opens_and_closes(tel: Telemetry, world: World) -> None:
    world.l2.down = True
    world.cache.sync.get_cached("b1", load_ok)  # read fails, write fails: 2 errors, breaker opens
    assert tel.value("tiercache.tier.errors", tier="remote", outcome="error") == 2
    assert tel.value("tiercache.tier.breaker.transitions", tier="remote", outcome="open") == 1
    assert tel.value("tiercache.tier.breaker.open", tier="remote", level=2) == 1
    world.cache.sync.get_cached("b2", load_ok)  # read and write skipped
    assert tel.value("tiercache.tier.errors", tier="remote", outcome="skipped") == 2
    world.l2.down = False
    world.clock.advance(6)
    world.cache.sync.get_cached("b3", load_ok)  # probe succeeds: breaker closes
    assert tel.value("tiercache.tier.breaker.transitions", tier="remote", outcome="closed") == 1
    assert tel.value("tiercache.tier.breaker.open", tier="remote") == 0
    assert tel.value("tiercache.loads", outcome="success") == 3


def test_full_scenario_matches_cache_stats(tel: Telemetry, world: World) -> None:
    run_all(world)
    snap = world.cache.stats.snapshot()
    for row in snap["tiers"]:
        tier = row["name"]
        assert tel.value("tiercache.tier.lookups", tier=tier, outcome="hit") == row["hits"]
        assert tel.value("tiercache.tier.lookups", tier=tier, outcome="miss") == row["misses"]
        assert tel.value("tiercache.tier.lookups", tier=tier, outcome="stale") == row["stale_hits"]
        assert tel.value("tiercache.tier.backfills", tier=tier) == row["backfills"]
        assert tel.value("tiercache.tier.errors", tier=tier, outcome="error") == row["errors"]
        assert tel.value("tiercache.tier.errors", tier=tier, outcome="skipped") == row["skipped"]
    assert tel.value("tiercache.loads", outcome="success") == snap["loads"] == 5
    assert tel.value("tiercache.loads", outcome="error") == snap["load_errors"] == 1


def test_attribute_set_is_fixed(tel: Telemetry, world: World) -> None:
    run_all(world)
    data = tel.reader.get_metrics_data()
    assert data is not None
    names = set()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                names.add(metric.name)
                for point in metric.data.data_points:
                    assert set(point.attributes or {}) <= set(ATTRIBUTES), (metric.name, point.attributes)
    assert {
        "tiercache.tier.lookups",
        "tiercache.loads",
        "tiercache.bus.gaps",
        "tiercache.lease.waits",
    } <= names


def test_spans_for_misses_and_loads_not_for_l1_hits(tel: Telemetry, world: World) -> None:
    world.cache.sync.get_cached("a", load_ok)
    (miss,) = tel.spans("tiercache.miss")
    (load,) = tel.spans("tiercache.load")
    assert load.parent is not None and load.parent.span_id == miss.context.span_id
    assert miss.attributes is not None and miss.attributes["tiercache.outcome"] == "LOADED"
    assert miss.attributes["tiercache.key"] == f"{world.cache.namespace}:a"
    assert miss.start_time is not None and load.start_time is not None and miss.end_time is not None
    assert miss.start_time <= load.start_time and load.end_time == miss.end_time
    for _ in range(5):
        world.cache.sync.get_cached("a", load_ok)  # L1 hits: no span
    assert len(tel.spans()) == 2
    world.l1.clear()
    world.cache.sync.get_cached("a", load_ok)  # L2 hit: a miss span, no load span
    assert [s.attributes["tiercache.outcome"] for s in tel.spans("tiercache.miss") if s.attributes] == [
        "LOADED",
        "remote",
    ]
    assert len(tel.spans("tiercache.load")) == 1


def test_failed_load_span_has_error_status(tel: Telemetry, world: World) -> None:
    world.cache.sync.get_cached("a", load_ok)
    stale_fail_safe(world)
    load = tel.spans("tiercache.load")[-1]
    assert load.status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in load.events)


def test_async_spans_nest_under_the_callers_span(tel: Telemetry, world: World) -> None:
    tracer = tel.tracers.get_tracer("app")

    async def handler() -> Any:
        with tracer.start_as_current_span("request"):
            return await world.cache.get_cached("x", load_ok)

    assert asyncio.run(handler()) == "v"
    (request,) = tel.spans("request")
    (miss,) = tel.spans("tiercache.miss")
    assert miss.parent is not None and miss.parent.span_id == request.context.span_id


def test_record_keys_false_keeps_keys_out(tel: Telemetry) -> None:
    w = new_world()
    instrument(w.cache, tel.meters, tel.tracers, record_keys=False)
    w.cache.sync.get_cached("secret-key", load_ok)
    for span in tel.spans():
        assert "tiercache.key" not in (span.attributes or {})


def test_redact_keys_keeps_keys_out_of_spans_by_default(tel: Telemetry) -> None:
    from tiercache import TieredCache
    from tiercache.adapters.memory import MemoryTier
    from tiercache.testing import FakeRemoteTier

    cache = TieredCache([MemoryTier(), FakeRemoteTier()], namespace="otelred", redact_keys=True)
    instrument(cache, tel.meters, tel.tracers)
    cache.sync.get_cached("secret-key", load_ok)
    assert tel.spans()
    for span in tel.spans():
        assert "tiercache.key" not in (span.attributes or {})
        assert "secret-key" not in str(span.to_json())
    # asked for explicitly, a redacting cache's spans still carry only the digest
    other = TieredCache([MemoryTier(), FakeRemoteTier()], namespace="otelred2", redact_keys=True)
    instrument(other, tel.meters, tel.tracers, record_keys=True)
    other.sync.get_cached("secret-key-2", load_ok)
    keys = [(s.attributes or {}).get("tiercache.key") for s in tel.spans()]
    assert any(str(k).startswith("key#") for k in keys if k)
    assert all("secret-key-2" not in str(s.to_json()) for s in tel.spans())


def test_existing_hook_still_called_and_uninstrument_restores_it(tel: Telemetry) -> None:
    w = new_world()
    before = w.cache._rt.hook
    inst = instrument(w.cache, tel.meters, tel.tracers)
    assert instrument(w.cache, tel.meters, tel.tracers) is inst  # idempotent
    w.cache.sync.get_cached("a", load_ok)
    assert [e.kind for e in w.events] == [EventKind.MISS, EventKind.LOAD]
    inst.uninstrument()
    assert w.cache._rt.hook is before
    w.cache.sync.get_cached("b", load_ok)
    assert len(w.events) == 4
    assert len(tel.spans("tiercache.load")) == 1
    assert tel.points("tiercache.loads") == []  # no longer observed


def test_hook_that_raises_does_not_stop_recording(tel: Telemetry, caplog: pytest.LogCaptureFixture) -> None:
    w = new_world()

    def bad(event: Any) -> None:
        raise RuntimeError("user hook bug")

    w.cache.add_event_hook(bad)
    instrument(w.cache, tel.meters, tel.tracers)
    assert w.cache.sync.get_cached("a", load_ok) == "v"
    assert len(tel.spans("tiercache.load")) == 1
    assert "user hook bug" in caplog.text


def test_two_caches_on_one_provider(tel: Telemetry) -> None:
    a, b = new_world(), new_world()
    instrument(a.cache, tel.meters)
    instrument(b.cache, tel.meters)
    a.cache.sync.get_cached("k", load_ok)
    b.cache.sync.get_cached("k", load_ok)
    b.cache.sync.get_cached("k2", load_ok)
    assert tel.value("tiercache.loads", namespace=a.cache.namespace) == 1
    assert tel.value("tiercache.loads", namespace=b.cache.namespace) == 2


def test_breaker_scenario_events_reach_current_span(tel: Telemetry, world: World) -> None:
    tracer = tel.tracers.get_tracer("app")
    with tracer.start_as_current_span("job"):
        breaker(world)
    (job,) = tel.spans("job")
    kinds = [e.name for e in job.events]
    assert "tiercache.tier_error" in kinds and "tiercache.tier_skipped" in kinds
    assert "tiercache.breaker_open" in kinds
