"""The sync driver: runs the flow with blocking tier calls, threads joining threads (and tasks)."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from ._adaptive import LoadContext
from ._adaptive import _current as _current_load
from ._batch import LoadMany, ManyResult, ReadMany, WriteMany, many_flow
from ._entry import Entry, next_version
from ._errors import ConfigurationError, LoaderTimeoutError, ValueTooLargeError
from ._events import EventKind
from ._flight import Flight, FlightAborted
from ._flow import (
    NO_LEASE,
    NOT_READ,
    AcquireLease,
    Load,
    LoadOutcome,
    Outcome,
    Read,
    ReleaseLease,
    Source,
    WaitForEntry,
    Write,
    better_stale,
)
from ._policy import Policy
from ._runtime import Runtime
from ._serde import Converter

__all__ = [
    "clear",
    "delete",
    "expire",
    "get",
    "get_cached",
    "get_many_cached",
    "invalidate_tags",
    "run_flow",
    "set_value",
]

logger = logging.getLogger("tiercache")


def run_flow(
    rt: Runtime,
    gen: Generator[Any, Any, Any],
    loader: Callable[..., Any],
    policy: Policy,
    fence: Flight | None,
) -> Any:
    """Drive ``gen`` to its outcome, doing each operation with blocking calls."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = gen.send(send) if error is None else gen.throw(error)
        except StopIteration as stop:
            return stop.value
        error = None
        try:
            send = _execute(rt, op, loader, policy, fence)
        except BaseException as exc:  # handed to the flow, which releases its lease and re-raises
            error, send = exc, None


def _execute(rt: Runtime, op: Any, loader: Callable[..., Any], policy: Policy, fence: Flight | None) -> Any:
    kind = type(op)
    if kind is Read:
        assert isinstance(op, Read)
        return rt.read_sync(op.index, op.key, op.converter, op.count_miss)
    if kind is Write:
        assert isinstance(op, Write)
        return rt.write_sync(op)
    if kind is Load:
        assert isinstance(op, Load)
        keeper = rt.lease_keeper(fence.key if fence else "", op.lease, policy.lease_ttl)
        if keeper is None:
            return _load(rt, loader, policy, op.has_stale, fence)
        keeper.start()
        try:
            return _load(rt, loader, policy, op.has_stale, fence)
        finally:
            keeper.stop()
    if kind is AcquireLease:
        assert isinstance(op, AcquireLease)
        if not rt.tier_usable(op.index, op.key):
            return NO_LEASE
        try:
            return rt.lease_tier(op.index).acquire_lease(op.key, op.ttl)
        except Exception as exc:
            rt.tier_failed(op.index, op.key, exc, "acquire_lease")
            return NO_LEASE
    if kind is ReleaseLease:
        assert isinstance(op, ReleaseLease)
        try:
            rt.lease_tier(op.index).release_lease(op.key, op.token)
        except Exception as exc:
            rt.tier_failed(op.index, op.key, exc, "release_lease")
        return None
    if kind is ReadMany:
        assert isinstance(op, ReadMany)
        if rt.tiers[op.index].in_process:
            return [rt.read_sync(op.index, k, op.converter) for k in op.keys]
        return rt.read_many_sync(op.index, op.keys, op.converter)
    if kind is WriteMany:
        assert isinstance(op, WriteMany)
        rt.write_many_sync(op.indices, op.items, op.fences, op.backfill)
        return None
    if kind is LoadMany:
        assert isinstance(op, LoadMany)
        return _load_many(rt, loader, op.keys)
    if kind is WaitForEntry:
        assert isinstance(op, WaitForEntry)
        started = time.perf_counter()
        try:
            raw = rt.lease_tier(op.index).wait_for_entry(op.key, op.timeout)
        except Exception as exc:
            rt.tier_failed(op.index, op.key, exc, "wait_for_entry")
            return None
        rt.emit(EventKind.LEASE_WAIT, op.key, op.index, time.perf_counter() - started)
        entry = rt.typed(op.index, op.key, raw, op.converter)
        if entry is not None and entry.tags and not rt.coherence.tags_valid_sync(entry):
            return None
        return entry
    raise AssertionError(f"unknown operation {op!r}")


def _load_many(rt: Runtime, load_many: Callable[..., Any], keys: Sequence[str]) -> LoadOutcome:
    """Call a batch loader (full keys in, {full key: value} out) and time it."""
    started, t0 = rt.clock(), time.perf_counter()
    try:
        values = load_many(keys)
        if inspect.isawaitable(values):
            raise ConfigurationError("the batch loader returned an awaitable; use the async API")
    except Exception as exc:
        duration = time.perf_counter() - t0
        rt.emit(EventKind.LOAD_ERROR, keys[0], duration=duration, error=exc)
        return LoadOutcome(error=exc, started_at=started, duration=duration)
    duration = time.perf_counter() - t0
    rt.emit(EventKind.LOAD, keys[0], duration=duration)
    return LoadOutcome(values, started_at=started, duration=duration)


def get_many_cached(
    rt: Runtime, keys: Sequence[str], load_many: Callable[..., Any], policy: Policy
) -> dict[str, Outcome]:
    """Values for ``keys`` (full keys): one L1 pass, one multi-key read per lower tier, one call of
    ``load_many`` for the rest; keys being loaded by other callers are joined, not reloaded."""
    if rt.bypass:
        return {k: Outcome(v, None, Source.LOADED) for k, v in load_many(list(keys)).items()}
    now = rt.clock()
    results: dict[str, Outcome] = {}
    stale: dict[str, Entry] = {}
    rt.coherence.ensure_started()
    for key in dict.fromkeys(keys):
        entry = l1_lookup(rt, key, now, stale)
        if entry is not None:
            results[key] = entry
    missing = [k for k in dict.fromkeys(keys) if k not in results]
    led: dict[str, Flight] = {}
    joined: dict[str, Flight] = {}
    for key in missing:
        flight, leader = rt.flights.join_or_lead(key, None)
        (led if leader else joined)[key] = flight
    if led:
        gen = many_flow(
            rt.plan,
            list(led),
            policy,
            stale=stale,
            versions={k: f.version for k, f in led.items()},
            fences=dict(led),
            build=rt.build_entry,
        )
        result = finish_many(rt, led, lambda: run_flow(rt, gen, load_many, policy, None))
        results.update(result.outcomes)
    for key, flight in joined.items():
        flight.wait_sync()
        if flight.error is None:
            outcome: Outcome = flight.outcome
            results[key] = Outcome(outcome.value, outcome.entry, Source.JOINED, outcome.tier)
    return results


def finish_many(rt: Runtime, led: dict[str, Flight], run: Callable[[], Any]) -> ManyResult:
    """Run a batch flow and resolve the flights it led, one outcome per key."""
    try:
        result: ManyResult = run()
    except BaseException as exc:
        error = exc if isinstance(exc, Exception) else FlightAborted(repr(exc))
        for flight in led.values():
            rt.flights.finish(flight, error=error)
        raise
    for key, flight in led.items():
        outcome = result.outcomes.get(key)
        if outcome is not None:
            rt.flights.finish(flight, outcome)
        else:  # not returned by the loader (or it failed): joiners fall back to loading alone
            rt.flights.finish(flight, error=FlightAborted("not returned by the batch loader"))
    if result.error is not None and any(k not in result.outcomes for k in led):
        raise result.error
    return result


def l1_lookup(rt: Runtime, key: str, now: float, stale: dict[str, Entry]) -> Outcome | None:
    """A fresh in-process hit as an Outcome (back-filled upward), remembering stale copies."""
    entry, i, best_stale, _ = rt.l1_walk(key, now, rt.coherence.tags_valid_sync)
    if best_stale is not None:
        stale[key] = best_stale
    return None if entry is None else Outcome(entry.value, entry, f"L{i + 1}", rt.names[i])


def _call_loader(loader: Callable[[], Any]) -> Any:
    value = loader()
    if inspect.isawaitable(value):
        close = getattr(value, "close", None)
        if close is not None:
            close()  # never awaited: close it so Python does not warn
        raise ConfigurationError(
            "the loader returned an awaitable; use the async API (await cache.get_cached) or a "
            "sync loader with cache.sync"
        )
    return value


class _Box:
    """The result of a loader running in a helper thread (used only when timeouts are set)."""

    def __init__(self, context: LoadContext) -> None:
        self.context = context
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.on_done: Callable[[_Box], None] | None = None
        self.lock = threading.Lock()

    def run(self, loader: Callable[[], Any]) -> None:
        try:
            self.value = _call_loader(loader)
        except BaseException as exc:  # reported through the box
            self.error = exc
        with self.lock:
            self.done.set()
            callback = self.on_done
        if callback is not None:
            callback(self)


def _load(
    rt: Runtime, loader: Callable[[], Any], policy: Policy, has_stale: bool, fence: Flight | None
) -> LoadOutcome:
    key = fence.key if fence else ""
    started = rt.clock()
    t0 = time.perf_counter()
    soft = policy.soft_timeout if (has_stale and policy.fail_safe) else None
    hard = policy.hard_timeout
    ctx = LoadContext(key)
    token = _current_load.set(ctx)
    try:
        if soft is None and hard is None:
            try:
                value = _call_loader(loader)
            except Exception as exc:
                duration = time.perf_counter() - t0
                rt.emit(EventKind.LOAD_ERROR, key, duration=duration, error=exc)
                return LoadOutcome(error=exc, started_at=started, duration=duration)
            duration = time.perf_counter() - t0
            rt.emit(EventKind.LOAD, key, duration=duration)
            return LoadOutcome(value, started_at=started, duration=duration, context=ctx)
        run_in_context = contextvars.copy_context().run  # the helper thread sees the LoadContext
    finally:
        _current_load.reset(token)

    # A sync function cannot be cancelled: run it in a daemon thread and stop *waiting* for it.
    box = _Box(ctx)
    threading.Thread(
        target=run_in_context, args=(box.run, loader), name="tiercache-loader", daemon=True
    ).start()
    first = soft if soft is not None and (hard is None or soft < hard) else hard
    if not box.done.wait(first):
        if first == soft and soft is not None:
            _finish_late(rt, box, policy, started, t0, fence)
            return LoadOutcome(soft_timed_out=True, started_at=started)
        timeout = LoaderTimeoutError(f"loader did not finish within hard_timeout={hard}s")
        rt.emit(EventKind.LOAD_ERROR, key, duration=time.perf_counter() - t0, error=timeout)
        return LoadOutcome(error=timeout, started_at=started)
    duration = time.perf_counter() - t0
    if box.error is not None:
        if not isinstance(box.error, Exception):
            raise box.error
        rt.emit(EventKind.LOAD_ERROR, key, duration=duration, error=box.error)
        return LoadOutcome(error=box.error, started_at=started, duration=duration)
    rt.emit(EventKind.LOAD, key, duration=duration)
    return LoadOutcome(box.value, started_at=started, duration=duration, context=ctx)


def _finish_late(
    rt: Runtime, box: _Box, policy: Policy, started: float, t0: float, fence: Flight | None
) -> None:
    """After a soft timeout: store the loader's result when it arrives (fenced by version)."""
    deadline = None if policy.hard_timeout is None else t0 + policy.hard_timeout

    def store(b: _Box) -> None:
        if b.error is not None or fence is None:
            return
        if deadline is not None and time.perf_counter() > deadline:
            return
        loaded = LoadOutcome(
            b.value, started_at=started, duration=time.perf_counter() - t0, context=b.context
        )
        entry = rt.build_entry(fence.key, b.value, policy, loaded, fence.version)
        if entry is not None:
            try:
                rt.write_sync(Write(rt.plan.write_order, fence.key, entry, backfill=False, fence=fence))
            except Exception:
                logger.exception("storing a late loader result for %s failed", rt.log_key(fence.key))

    with box.lock:
        if not box.done.is_set():
            box.on_done = store
            return
    store(box)


# --- the public operations ----------------------------------------------------------------


def _current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def get_cached(rt: Runtime, key: str, loader: Callable[[], Any], policy: Policy) -> Outcome:
    """The sync get_cached after key checks: L1 walk, then join or lead the flight."""
    if rt.bypass:
        return Outcome(_call_loader(loader), None, Source.LOADED)
    now = rt.clock()
    entry, i, stale, _ = rt.l1_walk(key, now, rt.coherence.tags_valid_sync)
    if entry is not None:
        if policy.early_refresh and policy.wants_early_refresh(entry, now):
            start_refresh(rt, key, loader, policy, entry)
        return Outcome(entry.value, entry, f"L{i + 1}", rt.names[i])
    if stale is not None and policy.swr:
        rt.emit(EventKind.STALE_SERVED, key, source=Source.STALE_SWR)
        start_refresh(rt, key, loader, policy, stale)
        return Outcome(stale.value, stale, Source.STALE_SWR)
    rt.coherence.ensure_started()
    while True:
        flight, leader = rt.flights.join_or_lead(key, None)
        if leader:
            return lead(rt, flight, key, loader, policy, stale)
        if flight.loop is not None and flight.loop is _current_loop():
            # Joining would block the very loop the leader runs on: fill on our own instead.
            solo = Flight(key, next_version(), None)
            return _run_leader_flow(rt, solo, key, loader, policy, stale)
        rt.emit(EventKind.JOIN, key)
        flight.wait_sync()
        if isinstance(flight.error, FlightAborted):
            continue
        shared: Outcome = flight.result()
        return Outcome(shared.value, shared.entry, Source.JOINED, shared.tier)


def _run_leader_flow(
    rt: Runtime,
    flight: Flight,
    key: str,
    loader: Callable[[], Any],
    policy: Policy,
    stale: Entry | None,
    refresh: bool = False,
) -> Outcome:
    first_read: Any = NOT_READ
    first = rt.read_first
    if first is not None and not refresh:
        # The lease tier is read here, without the flow's machinery: most flights end on a hit
        # there (see _flow's theory). Anything but a fresh answer is handed to the flow.
        first_read = rt.read_sync(first, key, policy.converter)
        hit = rt.read_first_hit(key, policy, first_read)
        if hit is not None:
            return hit
    gen = rt.fill_flow(flight, key, policy, stale, refresh, first_read)
    outcome: Outcome = run_flow(rt, gen, loader, policy, flight)
    if outcome.source in (Source.STALE_SWR, Source.STALE_FAILSAFE):
        rt.emit(EventKind.STALE_SERVED, key, source=outcome.source)
    return outcome


def lead(
    rt: Runtime,
    flight: Flight,
    key: str,
    loader: Callable[[], Any],
    policy: Policy,
    stale: Entry | None,
    refresh: bool = False,
) -> Outcome:
    """Run the flow as this flight's leader, then resolve the flight for everyone who joined."""
    try:
        outcome = _run_leader_flow(rt, flight, key, loader, policy, stale, refresh)
    except BaseException as exc:
        rt.flights.finish(flight, error=exc if isinstance(exc, Exception) else FlightAborted(repr(exc)))
        raise
    rt.flights.finish(flight, outcome)
    if outcome.refresh:
        start_refresh(rt, key, loader, policy, outcome.entry)
    return outcome


def start_refresh(
    rt: Runtime, key: str, loader: Callable[[], Any], policy: Policy, current: Entry | None
) -> None:
    """Refresh ``key`` in a background thread, unless a flight for it is already running."""
    flight, leader = rt.flights.join_or_lead(key, None)
    if not leader:
        return

    def refresh() -> None:
        try:
            lead(rt, flight, key, loader, policy, current, refresh=True)
        except Exception as exc:
            logger.debug("background refresh of %s failed: %s", rt.log_key(key), rt.log_error(exc, key))
        finally:
            rt.threads.discard(threading.current_thread())

    thread = threading.Thread(target=refresh, name="tiercache-refresh", daemon=True)
    rt.threads.add(thread)
    thread.start()


def get(rt: Runtime, key: str, default: Any, conv: Converter | None, allow_stale: bool) -> Any:
    """Read through every tier without loading; back-fills what it finds."""
    if rt.bypass:
        return default
    now = rt.clock()
    rt.coherence.ensure_started()
    entry, _, stale, _ = rt.l1_walk(key, now, rt.coherence.tags_valid_sync)
    if entry is not None:
        return entry.value
    for i in rt.remote:
        entry = rt.read_sync(i, key, conv)
        if entry is None:
            continue
        if now < entry.fresh_until:
            rt.write_sync(Write(range(i), key, entry, backfill=True))
            return entry.value
        if now < entry.stale_until and better_stale(entry, stale):
            stale = entry
    return stale.value if allow_stale and stale is not None else default


def new_entry(rt: Runtime, key: str, value: Any, policy: Policy) -> Entry:
    entry = policy.new_entry(key, value, rt.clock(), version=next_version())
    rt.prepare(entry, range(len(rt.tiers)))  # SerializationError before any tier is touched
    return entry


def set_value(rt: Runtime, key: str, value: Any, policy: Policy) -> None:
    if rt.bypass:
        rt.codec.dumps(policy.new_entry(key, value, rt.clock()))  # still report bad values
        return
    rt.coherence.ensure_started()
    entry = new_entry(rt, key, value, policy)
    # A load of this key already running started before this write: it must not store its
    # (older) result, even in an L1 that has meanwhile evicted this entry.
    rt.coherence.invalidate_locally(key, entry.version, "mark")
    if rt.write_sync(Write(rt.plan.write_order, key, entry, backfill=False)) < 0:
        raise ValueTooLargeError(f"the value for {key!r} is too large for every tier")
    rt.coherence.publish_sync("set", (key,), (), entry.version, entry.created_at)


def delete(rt: Runtime, key: str) -> None:
    version = next_version()
    rt.coherence.invalidate_locally(key, version, "delete")
    rt.delete_sync(key, version)
    rt.coherence.publish_sync("delete", (key,), (), version, rt.clock())


def expire(rt: Runtime, key: str) -> None:
    version, at = next_version(), rt.clock()
    rt.coherence.invalidate_locally(key, version, "mark")
    rt.expire_sync(key, at, version)
    rt.coherence.publish_sync("expire", (key,), (), version, at)


def invalidate_tags(rt: Runtime, tags: Sequence[str]) -> None:
    at = rt.clock()
    rt.coherence.invalidate_tags_locally(tags, at)
    rt.store_tag_times_sync(tags, at)
    rt.coherence.publish_sync("tags", (), tags, next_version(), at)


def clear(rt: Runtime) -> None:
    version = next_version()
    rt.clear_sync(rt.coherence.prefix, version)
    rt.coherence.publish_sync("clear", (), (), version, rt.clock())
