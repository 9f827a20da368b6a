"""OpenTelemetry for a TieredCache: counters read from ``cache.stats``, histograms and spans from events.

Install with ``pip install 'tiercache-py[otel]'``. OpenTelemetry is imported when :func:`instrument`
runs, never by ``import tiercache``.

* **Counters** are *observable*: they read ``cache.stats`` when the SDK collects, so the hit path
  pays nothing (an inline L1 hit stays one ``+= 1``) and L1 hits, which raise no event, are exact.
* **Histograms** (load duration, lease-wait duration) and **spans** (``tiercache.miss`` and its
  child ``tiercache.load``) come from the cache's event hook, which :func:`instrument` chains in
  front of any hook already installed. L1 hits never make a span.

Every metric carries attributes from one fixed set -- ``tiercache.namespace``, ``tiercache.tier``,
``tiercache.level``, ``tiercache.outcome`` -- never a key or an error message, so cardinality stays
bounded by (caches x tiers x outcomes).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._events import Event, EventHook, EventKind

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from ._cache import TieredCache

__all__ = ["ATTRIBUTES", "Instrumentation", "instrument"]

logger = logging.getLogger("tiercache")

NAMESPACE = "tiercache.namespace"
TIER = "tiercache.tier"
LEVEL = "tiercache.level"
OUTCOME = "tiercache.outcome"
KEY = "tiercache.key"  # span attribute only (``record_keys=True``); never on a metric

#: The only attribute keys tiercache's metrics use.
ATTRIBUTES = (NAMESPACE, TIER, LEVEL, OUTCOME)

_REMOTE_READS = frozenset({EventKind.HIT, EventKind.MISS, EventKind.STALE_HIT, EventKind.CORRUPT})
_MAX_OPEN = 1024  # flights tracked at once for miss spans (oldest forgotten first)
_MAX_OPEN_AGE = 120.0  # seconds: an older "first read" mark belongs to some other call


def _import_otel() -> tuple[Any, Any]:
    try:
        from opentelemetry import metrics, trace
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "tiercache.otel needs the OpenTelemetry API: pip install 'tiercache-py[otel]'"
        ) from exc
    return metrics, trace


# --- metrics ------------------------------------------------------------------------------------

Attrs = tuple[tuple[str, Any], ...]


def _tier_rows(caches: Iterable[TieredCache]) -> Iterator[tuple[TieredCache, int, dict[str, Any]]]:
    for cache in caches:
        stats = cache.stats
        for index, tier in enumerate(stats.tiers):
            row = dict(vars(tier))
            row["hits"] = stats.tier_hits(index)
            yield cache, index, row


def _tier_attrs(cache: TieredCache, index: int, row: dict[str, Any]) -> dict[str, Any]:
    return {NAMESPACE: cache.namespace, TIER: row["name"], LEVEL: index + 1}


def _summed(points: Iterable[tuple[dict[str, Any], float]]) -> list[Observation]:
    """One observation per attribute set (two caches sharing a namespace are added up)."""
    from opentelemetry.metrics import Observation

    totals: dict[Attrs, float] = {}
    for attrs, value in points:
        k = tuple(sorted(attrs.items()))
        totals[k] = totals.get(k, 0) + value
    return [Observation(v, dict(k)) for k, v in totals.items()]


class _Meters:
    """The instruments of one meter provider, observing every cache instrumented with it.

    OpenTelemetry keeps the first instrument registered under a name (a second registration's
    callbacks are dropped), so all caches share one set of instruments per provider.
    """

    def __init__(self, meter: Meter) -> None:
        self.caches: weakref.WeakSet[TieredCache] = weakref.WeakSet()
        self.load_duration = meter.create_histogram(
            "tiercache.load.duration", unit="s", description="Loader calls: duration (outcome: success/error)"
        )
        self.lease_wait_duration = meter.create_histogram(
            "tiercache.lease.wait.duration",
            unit="s",
            description="Waits at a shared tier for another process's load",
        )
        self.read_duration = meter.create_histogram(
            "tiercache.tier.read.duration",
            unit="s",
            description="Reads of shared tiers (when the core reports their duration)",
        )
        counters: list[tuple[str, str, str, Callable[[], list[Observation]]]] = [
            ("tiercache.tier.lookups", "{lookup}", "Tier reads by outcome (hit/stale/miss)", self._lookups),
            ("tiercache.tier.backfills", "{entry}", "Entries copied up into a tier", self._backfills),
            (
                "tiercache.tier.errors",
                "{call}",
                "Tier calls that failed (error), held bad bytes (corrupt) or were skipped (breaker open)",
                self._errors,
            ),
            (
                "tiercache.tier.breaker.transitions",
                "{transition}",
                "Circuit breaker state changes (outcome: open/closed)",
                self._transitions,
            ),
            ("tiercache.loads", "{call}", "Loader calls (outcome: success/error)", self._loads),
            (
                "tiercache.joins",
                "{call}",
                "Callers that joined an in-process flight",
                self._cache_attr("joins"),
            ),
            (
                "tiercache.stale_served",
                "{value}",
                "Stale values returned (stale-while-revalidate or fail-safe)",
                self._cache_attr("stale_served"),
            ),
            (
                "tiercache.lease.waits",
                "{wait}",
                "Waits for another process's load",
                self._cache_attr("lease_waits"),
            ),
            (
                "tiercache.bus.messages",
                "{message}",
                "Invalidation messages applied from other processes",
                self._cache_attr("bus_messages"),
            ),
            (
                "tiercache.bus.gaps",
                "{gap}",
                "Lost invalidation messages (L1 was cleared)",
                self._cache_attr("bus_gaps"),
            ),
        ]
        for name, unit, description, source in counters:
            meter.create_observable_counter(
                name, callbacks=[_callback(source)], unit=unit, description=description
            )
        meter.create_observable_gauge(
            "tiercache.tier.breaker.open",
            callbacks=[_callback(self._breaker_open)],
            unit="1",
            description="1 while a tier's circuit breaker is open (or probing), else 0",
        )

    def _lookups(self) -> list[Observation]:
        points = []
        for cache, index, row in _tier_rows(self.caches):
            base = _tier_attrs(cache, index, row)
            for outcome, field in (("hit", "hits"), ("stale", "stale_hits"), ("miss", "misses")):
                points.append(({**base, OUTCOME: outcome}, row[field]))
        return _summed(points)

    def _backfills(self) -> list[Observation]:
        return _summed((_tier_attrs(c, i, row), row["backfills"]) for c, i, row in _tier_rows(self.caches))

    def _errors(self) -> list[Observation]:
        points = []
        for cache, index, row in _tier_rows(self.caches):
            base = _tier_attrs(cache, index, row)
            for outcome, field in (("error", "errors"), ("corrupt", "corrupt"), ("skipped", "skipped")):
                points.append(({**base, OUTCOME: outcome}, row[field]))
        return _summed(points)

    def _transitions(self) -> list[Observation]:
        points = []
        for cache, index, row in _tier_rows(self.caches):
            base = _tier_attrs(cache, index, row)
            points.append(({**base, OUTCOME: "open"}, row["breaker_opened"]))
            points.append(({**base, OUTCOME: "closed"}, row["breaker_closed"]))
        return _summed(points)

    def _breaker_open(self) -> list[Observation]:
        # Every open is followed by exactly one close once the tier answers again.
        return _summed(
            (_tier_attrs(c, i, row), 1 if row["breaker_opened"] > row["breaker_closed"] else 0)
            for c, i, row in _tier_rows(self.caches)
        )

    def _loads(self) -> list[Observation]:
        points = []
        for cache in self.caches:
            stats = cache.stats
            points.append(({NAMESPACE: cache.namespace, OUTCOME: "success"}, stats.loads))
            points.append(({NAMESPACE: cache.namespace, OUTCOME: "error"}, stats.load_errors))
        return _summed(points)

    def _cache_attr(self, field: str) -> Callable[[], list[Observation]]:
        def observe() -> list[Observation]:
            return _summed(({NAMESPACE: c.namespace}, getattr(c.stats, field)) for c in self.caches)

        return observe


def _callback(source: Callable[[], list[Observation]]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        return source()

    return callback


_meters_lock = threading.Lock()
_meters: weakref.WeakKeyDictionary[Any, _Meters] = weakref.WeakKeyDictionary()


def _meters_for(provider: Any, metrics: Any) -> _Meters:
    with _meters_lock:
        found = _meters.get(provider)
        if found is None:
            from . import __version__

            meter = metrics.get_meter("tiercache", __version__, meter_provider=provider)
            found = _meters[provider] = _Meters(meter)
        return found


# --- the hook: histograms and spans -------------------------------------------------------------


class _Open:
    """The first shared-tier read of a flight, kept until the flight's outcome is known."""

    __slots__ = ("seen", "start_ns", "tiers")

    def __init__(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self.seen = time.monotonic()
        self.tiers: list[str] = []


def _context_id(key: str) -> tuple[str, int, int]:
    """Which caller an event belongs to: the key, the thread and the asyncio task (if any)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return key, threading.get_ident(), id(task) if task is not None else 0


class Instrumentation:
    """What :func:`instrument` installed on one cache. ``uninstrument()`` takes it off again.

    It is itself an event hook (``instrumentation(event)``): the hook the cache now calls, which
    records the event and then calls the hook that was there before (``previous``).
    """

    def __init__(
        self,
        cache: TieredCache,
        meters: _Meters | None,
        tracer: Tracer | None,
        previous: EventHook | None,
        record_keys: bool,
    ) -> None:
        self.cache = cache
        self.previous = previous
        self._meters = meters
        self._tracer = tracer
        self._record_keys = record_keys
        self._namespace = cache.namespace
        self._levels: dict[str, int] = {}
        for index, tier in enumerate(cache.tiers):
            self._levels.setdefault(tier.name, index + 1)
        self._open: OrderedDict[tuple[str, int, int], _Open] = OrderedDict()
        self._lock = threading.Lock()
        self._installed = False
        self._remove_hook: Callable[[], None] = lambda: None

    def __call__(self, event: Event) -> None:
        try:
            self._record(event)
        except Exception:  # never let telemetry break a request; still call the user's hook
            logger.exception("OpenTelemetry: recording %s failed", event.kind)
        if self.previous is not None:
            self.previous(event)

    def uninstrument(self) -> None:
        """Restore the cache's previous hook and stop reporting this cache's counters."""
        if not self._installed:
            return
        self._remove_hook()
        if self._meters is not None:
            self._meters.caches.discard(self.cache)
        _installed.pop(self.cache, None)
        self._installed = False

    # --- recording ------------------------------------------------------------------------

    def _tier_attrs(self, tier: str | None) -> dict[str, Any]:
        attrs: dict[str, Any] = {NAMESPACE: self._namespace}
        if tier is not None:
            attrs[TIER] = tier
            attrs[LEVEL] = self._levels.get(tier, 0)
        return attrs

    def _record(self, event: Event) -> None:
        kind = event.kind
        meters = self._meters
        if meters is not None:
            if kind == EventKind.LOAD or kind == EventKind.LOAD_ERROR:
                outcome = "success" if kind == EventKind.LOAD else "error"
                if event.duration is not None:
                    meters.load_duration.record(
                        event.duration, {NAMESPACE: self._namespace, OUTCOME: outcome}
                    )
            elif kind == EventKind.LEASE_WAIT and event.duration is not None:
                meters.lease_wait_duration.record(event.duration, self._tier_attrs(event.tier))
            elif kind in _REMOTE_READS and event.duration is not None:
                meters.read_duration.record(event.duration, self._tier_attrs(event.tier))
        if self._tracer is not None:
            self._trace(event)

    def _trace(self, event: Event) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        kind = event.kind
        now = time.time_ns()
        level = self._levels.get(event.tier, 0) if event.tier is not None else 0
        if level >= 2 and (kind in _REMOTE_READS or kind == EventKind.LEASE_WAIT):
            started = now - int((event.duration or 0.0) * 1e9)
            ctx = _context_id(event.key)
            with self._lock:
                mark = self._open.get(ctx)
                if mark is None or time.monotonic() - mark.seen > _MAX_OPEN_AGE:
                    mark = self._open[ctx] = _Open(started)
                    while len(self._open) > _MAX_OPEN:
                        self._open.popitem(last=False)
                mark.tiers.append(f"{event.tier}:{kind}")
            if kind == EventKind.HIT:  # a shared tier answered: the miss ends here
                self._end_miss(ctx, now, outcome=event.tier or "", error=None)
            return
        if kind == EventKind.LOAD or kind == EventKind.LOAD_ERROR:
            ctx = _context_id(event.key)
            duration_ns = int((event.duration or 0.0) * 1e9)
            load_start = now - duration_ns
            miss = self._end_miss(
                ctx,
                now,
                outcome="LOADED" if kind == EventKind.LOAD else "load_error",
                error=event.error,
                start_if_new=load_start,
                end=False,
            )
            assert self._tracer is not None
            span = self._tracer.start_span(
                "tiercache.load",
                context=trace.set_span_in_context(miss),
                start_time=load_start,
                attributes=self._span_attrs(event.key),
            )
            if event.error is not None:
                span.set_status(Status(StatusCode.ERROR, type(event.error).__name__))
                span.record_exception(event.error)
            span.end(end_time=now)
            miss.end(end_time=now)
            return
        # Everything else is a point in time: an event on the caller's current span.
        current = trace.get_current_span()
        if current.is_recording() and kind != EventKind.BACKFILL:
            attrs = self._tier_attrs(event.tier)
            if event.error is not None:
                attrs["exception.type"] = type(event.error).__name__
            current.add_event(f"tiercache.{kind}", attributes=attrs)

    def _span_attrs(self, key: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {NAMESPACE: self._namespace}
        if self._record_keys:
            attrs[KEY] = key
        return attrs

    def _end_miss(
        self,
        ctx: tuple[str, int, int],
        now: int,
        *,
        outcome: str,
        error: BaseException | None,
        start_if_new: int | None = None,
        end: bool = True,
    ) -> Span:
        """Build the ``tiercache.miss`` span of the flight ``ctx`` (from its first shared-tier
        read, or ``start_if_new``) and end it at ``now`` unless ``end`` is False."""
        from opentelemetry.trace import Status, StatusCode

        with self._lock:
            mark = self._open.pop(ctx, None)
        if mark is not None and time.monotonic() - mark.seen > _MAX_OPEN_AGE:
            mark = None
        start = mark.start_ns if mark is not None else (start_if_new if start_if_new is not None else now)
        attrs = self._span_attrs(ctx[0])
        attrs[OUTCOME] = outcome
        if mark is not None:
            attrs["tiercache.reads"] = mark.tiers
        assert self._tracer is not None
        span = self._tracer.start_span("tiercache.miss", start_time=min(start, now), attributes=attrs)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        if end:
            span.end(end_time=now)
        return span


_installed: weakref.WeakKeyDictionary[TieredCache, Instrumentation] = weakref.WeakKeyDictionary()


def instrument(
    cache: TieredCache,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    *,
    metrics: bool = True,
    traces: bool = True,
    record_keys: bool | None = None,
) -> Instrumentation:
    """Export ``cache``'s metrics and spans through OpenTelemetry.

    ``meter_provider``/``tracer_provider`` default to the global ones. The cache's current event
    hook (``on_event=``) keeps working: it is called after tiercache's own recording. Spans:
    ``tiercache.miss`` for each lookup that went past L1 (from its first shared-tier read to the
    outcome) with a child ``tiercache.load`` when the loader ran; other events (tier errors,
    joins, stale serves) become span events on the caller's current span. ``record_keys=False``
    keeps cache keys out of spans (metrics never carry keys); by default keys are recorded unless
    the cache was created with ``redact_keys=True`` (and then only ever as their digests).
    Calling it again for the same cache returns the existing instrumentation.
    """
    otel_metrics, otel_trace = _import_otel()
    found = _installed.get(cache)
    if found is not None:
        return found
    if not hasattr(cache, "add_event_hook"):
        raise TypeError(f"instrument() needs a TieredCache, not {type(cache).__name__}")
    meters = None
    if metrics:
        provider = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
        meters = _meters_for(provider, otel_metrics)
    tracer = None
    if traces:
        from . import __version__

        tracer = otel_trace.get_tracer("tiercache", __version__, tracer_provider=tracer_provider)
    if record_keys is None:
        record_keys = not getattr(getattr(cache, "_rt", None), "redact_keys", False)
    inst = Instrumentation(cache, meters, tracer, None, record_keys)
    inst._remove_hook = cache.add_event_hook(inst)
    if meters is not None:
        meters.caches.add(cache)
    inst._installed = True
    _installed[cache] = inst
    return inst
