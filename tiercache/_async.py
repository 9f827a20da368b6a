"""The async driver: runs the flow with awaited tier calls; flights run as tasks of their own."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from ._adaptive import LoadContext
from ._adaptive import _current as _current_load
from ._batch import LoadMany, ManyResult, ReadMany, WriteMany, many_flow
from ._entry import Entry, next_version
from ._errors import LoaderTimeoutError, ValueTooLargeError
from ._events import EventKind
from ._flight import Flight, FlightAborted
from ._flow import (
    NO_LEASE,
    NOT_READ,
    AcquireLease,
    Load,
    LoadOutcome,
    Operation,
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
from ._sync import finish_many, new_entry

__all__ = [
    "FlowRun",
    "clear",
    "delete",
    "expire",
    "get",
    "get_cached",
    "get_many_cached",
    "invalidate_tags",
    "set_value",
]

logger = logging.getLogger("tiercache")

Loader = Callable[[], Any]


class FlowRun:
    """One run of the flow, resumable: if the task driving it is cancelled mid-operation, the
    pending operation is kept and :meth:`run` can be called again (from another task) to redo it
    and go on. A loader already started is never called twice: its task is kept and re-awaited."""

    __slots__ = (
        "_context",
        "_load_started",
        "_load_t0",
        "_load_task",
        "_pending",
        "fence",
        "gen",
        "loader",
        "policy",
        "rt",
    )

    def __init__(
        self,
        rt: Runtime,
        gen: Generator[Any, Any, Any],
        loader: Loader,
        policy: Policy,
        fence: Flight | None,
    ) -> None:
        self.rt = rt
        self.gen = gen
        self.loader = loader
        self.policy = policy
        self.fence = fence
        self._pending: Operation | None = None
        self._load_task: asyncio.Future[Any] | None = None
        self._load_started = 0.0
        self._load_t0 = 0.0
        self._context: LoadContext | None = None

    def abort(self) -> None:
        """Give up for good: cancel a loader still running."""
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()

    async def run(self) -> Any:
        send: Any = None
        error: BaseException | None = None
        while True:
            if self._pending is None:
                try:
                    self._pending = self.gen.send(send) if error is None else self.gen.throw(error)
                except StopIteration as stop:
                    return stop.value
            error = None
            op = self._pending
            try:
                if type(op) is Read and not self.rt.tiers[op.index].in_process:
                    # The common case, without the dispatch coroutine in between.
                    send = await self.rt.read_async(op.index, op.key, op.converter, op.count_miss)
                else:
                    send = await self._execute(op)
            except asyncio.CancelledError:
                raise  # the operation stays pending: a resumed run redoes it
            except BaseException as exc:  # handed to the flow, which releases its lease and re-raises
                error, send = exc, None
            self._pending = None

    async def _execute(self, op: Any) -> Any:
        rt = self.rt
        kind = type(op)
        if kind is ReadMany:
            if rt.tiers[op.index].in_process:
                return [rt.read_sync(op.index, k, op.converter) for k in op.keys]
            return await rt.read_many_async(op.index, op.keys, op.converter)
        if kind is WriteMany:
            await rt.write_many_async(op.indices, op.items, op.fences, op.backfill)
            return None
        if kind is LoadMany:
            return await self._load_many(op.keys)
        if kind is Read:
            assert isinstance(op, Read)
            if rt.tiers[op.index].in_process:
                return rt.read_sync(op.index, op.key, op.converter, op.count_miss)
            return await rt.read_async(op.index, op.key, op.converter, op.count_miss)
        if kind is Write:
            assert isinstance(op, Write)
            return await rt.write_async(op)
        if kind is Load:
            assert isinstance(op, Load)
            return await self._load(op.has_stale, op.lease)
        if kind is AcquireLease:
            assert isinstance(op, AcquireLease)
            if not rt.tier_usable(op.index, op.key):
                return NO_LEASE
            try:
                return await rt.lease_tier(op.index).aacquire_lease(op.key, op.ttl)
            except Exception as exc:
                rt.tier_failed(op.index, op.key, exc, "acquire_lease")
                return NO_LEASE
        if kind is ReleaseLease:
            assert isinstance(op, ReleaseLease)
            try:
                await rt.lease_tier(op.index).arelease_lease(op.key, op.token)
            except Exception as exc:
                rt.tier_failed(op.index, op.key, exc, "release_lease")
            return None
        if kind is WaitForEntry:
            assert isinstance(op, WaitForEntry)
            started = time.perf_counter()
            try:
                raw = await rt.lease_tier(op.index).await_for_entry(op.key, op.timeout)
            except Exception as exc:
                rt.tier_failed(op.index, op.key, exc, "wait_for_entry")
                return None
            rt.emit(EventKind.LEASE_WAIT, op.key, op.index, time.perf_counter() - started)
            entry = rt.typed(op.index, op.key, raw, op.converter)
        if entry is not None and entry.tags and not await rt.coherence.tags_valid_async(entry):
            return None
        return entry
        raise AssertionError(f"unknown operation {op!r}")

    async def _load(self, has_stale: bool, lease: tuple[int, str] | None = None) -> LoadOutcome:
        rt, policy = self.rt, self.policy
        key = self.fence.key if self.fence is not None else ""
        if self._load_task is None:
            self._load_started = rt.clock()
            self._load_t0 = time.perf_counter()
            self._context = LoadContext(key)
            token = _current_load.set(self._context)
            try:
                result = self.loader()
                if not inspect.isawaitable(result):
                    return self._loaded(key, result)
                self._load_task = asyncio.ensure_future(result)  # copies the context, ctx included
            except Exception as exc:
                return self._failed(key, exc)
            finally:
                _current_load.reset(token)
        task, t0 = self._load_task, self._load_t0
        soft = policy.soft_timeout if (has_stale and policy.fail_safe) else None
        hard = policy.hard_timeout
        first = soft if soft is not None and (hard is None or soft < hard) else hard
        keeper = rt.lease_keeper(key, lease, policy.lease_ttl)
        while True:
            remaining = None if first is None else max(0.0, t0 + first - time.perf_counter())
            step = remaining
            if keeper is not None:
                step = keeper.every if remaining is None else min(keeper.every, remaining)
            await asyncio.wait({task}, timeout=step)  # never cancels the loader itself
            if task.done() or keeper is None or (remaining is not None and step == remaining):
                break
            if not await keeper.aextend():
                keeper = None  # the lease is gone: stop extending, keep waiting
        if task.done():
            if task.cancelled():
                return self._failed(key, LoaderTimeoutError("the loader was cancelled"))
            failure = task.exception()
            if failure is not None:
                if not isinstance(failure, Exception):
                    raise failure
                return self._failed(key, failure)
            return self._loaded(key, task.result())
        if first == soft and soft is not None:
            # Soft timeout with something stale to serve: the load goes on and stores its result.
            rt.track(asyncio.get_running_loop().create_task(self._finish_late(task)))
            return LoadOutcome(soft_timed_out=True, started_at=self._load_started)
        task.cancel()
        return self._failed(
            key, LoaderTimeoutError(f"loader did not finish within hard_timeout={hard}s; it was cancelled")
        )

    async def _load_many(self, keys: Sequence[str]) -> LoadOutcome:
        """Call a batch loader (full keys in, {full key: value} out; sync or async) and time it."""
        rt = self.rt
        started, t0 = rt.clock(), time.perf_counter()
        try:
            load_many: Callable[..., Any] = self.loader
            values = load_many(keys)
            if inspect.isawaitable(values):
                values = await values
        except Exception as exc:
            duration = time.perf_counter() - t0
            rt.emit(EventKind.LOAD_ERROR, keys[0], duration=duration, error=exc)
            return LoadOutcome(error=exc, started_at=started, duration=duration)
        duration = time.perf_counter() - t0
        rt.emit(EventKind.LOAD, keys[0], duration=duration)
        return LoadOutcome(values, started_at=started, duration=duration)

    def _loaded(self, key: str, value: Any) -> LoadOutcome:
        duration = time.perf_counter() - self._load_t0
        self.rt.emit(EventKind.LOAD, key, duration=duration)
        return LoadOutcome(value, started_at=self._load_started, duration=duration, context=self._context)

    def _failed(self, key: str, exc: Exception) -> LoadOutcome:
        duration = time.perf_counter() - self._load_t0
        self.rt.emit(EventKind.LOAD_ERROR, key, duration=duration, error=exc)
        return LoadOutcome(error=exc, started_at=self._load_started, duration=duration)

    async def _finish_late(self, task: asyncio.Future[Any]) -> None:
        """After a soft timeout: wait (up to the hard timeout) and store the result, fenced."""
        rt, policy, fence = self.rt, self.policy, self.fence
        hard = policy.hard_timeout
        remaining = None if hard is None else max(0.0, self._load_t0 + hard - time.perf_counter())
        try:
            value = await asyncio.wait_for(task, remaining)
        except Exception as exc:  # the caller already got stale; a late failure is only logged
            logger.debug(
                "late loader for %s failed: %s",
                rt.log_key(fence.key if fence else ""),
                rt.log_error(exc, fence.key if fence else ""),
            )
            return
        if fence is None:
            return
        loaded = LoadOutcome(
            value,
            started_at=self._load_started,
            duration=time.perf_counter() - self._load_t0,
            context=self._context,
        )
        entry = rt.build_entry(fence.key, value, policy, loaded, fence.version)
        if entry is not None:
            await rt.write_async(Write(rt.plan.write_order, fence.key, entry, backfill=False, fence=fence))


# --- the public operations ----------------------------------------------------------------


async def l1_walk(rt: Runtime, key: str, now: float) -> tuple[Entry | None, int, Entry | None]:
    """``Runtime.l1_walk`` for async callers: tag times it does not know are fetched, awaited."""
    coherence = rt.coherence
    while True:
        entry, i, stale, unknown = rt.l1_walk(key, now, coherence.tags_valid_locally)
        if unknown is None:
            return entry, i, stale
        await coherence.tags_valid_async(unknown)  # learns the times (or gives up) ...
        if coherence.tags_valid_locally(unknown) is None:  # ... the store was unreachable
            entry, i, stale, _ = rt.l1_walk(key, now, coherence.known_valid)
            return entry, i, stale


async def get_cached(rt: Runtime, key: str, loader: Loader, policy: Policy) -> Outcome:
    """The async get_cached after key checks: L1 walk, then join or lead the flight."""
    if rt.bypass:
        value = loader()
        if inspect.isawaitable(value):
            value = await value
        return Outcome(value, None, Source.LOADED)
    if rt.l1:
        now = rt.clock()
        entry, i, stale = await l1_walk(rt, key, now)
    else:
        entry, i, stale = None, -1, None
    if entry is not None:
        if policy.early_refresh and policy.wants_early_refresh(entry, now):
            start_refresh(rt, key, loader, policy, entry)
        return Outcome(entry.value, entry, f"L{i + 1}", rt.names[i])
    if stale is not None and policy.swr:
        rt.emit(EventKind.STALE_SERVED, key, source=Source.STALE_SWR)
        start_refresh(rt, key, loader, policy, stale)
        return Outcome(stale.value, stale, Source.STALE_SWR)
    loop = asyncio.get_running_loop()
    rt.coherence.ensure_started()
    # Join the key's flight, or lead it inline (no task is created unless the leader is
    # cancelled: then a task takes over the pending operation and finishes for the joiners).
    while True:
        flight, leader = rt.flights.join_or_lead(key, loop)
        if leader:
            first = rt.read_first
            if first is None:
                return await lead(rt, flight, key, loader, policy, stale)
            # The lease tier is read here, without the flow's machinery: most flights end on a
            # hit there (see _flow's theory). Anything but a fresh answer goes to the flow.
            try:
                first_read = await rt.read_async(first, key, policy.converter)
            except BaseException as exc:  # as in lead(); a take-over runs the whole flow
                run = FlowRun(rt, rt.fill_flow(flight, key, policy, stale, False), loader, policy, flight)
                _leader_gave_up(rt, run, flight, key, loader, policy, exc)
                raise
            hit = rt.read_first_hit(key, policy, first_read)
            if hit is not None:
                _finished(rt, flight, key, loader, policy, hit)
                return hit
            return await lead(rt, flight, key, loader, policy, stale, first_read=first_read)
        rt.emit(EventKind.JOIN, key)
        await flight.wait_async()
        if isinstance(flight.error, FlightAborted):
            continue
        shared: Outcome = flight.result()
        return Outcome(shared.value, shared.entry, Source.JOINED, shared.tier)


async def lead(
    rt: Runtime,
    flight: Flight,
    key: str,
    loader: Loader,
    policy: Policy,
    stale: Entry | None,
    refresh: bool = False,
    first_read: Any = NOT_READ,
) -> Outcome:
    """Run the flow as this flight's leader, resolve the flight, and return (or raise) its outcome."""
    gen = rt.fill_flow(flight, key, policy, stale, refresh, first_read)
    run = FlowRun(rt, gen, loader, policy, flight)
    try:
        outcome: Outcome = await run.run()
    except BaseException as exc:
        _leader_gave_up(rt, run, flight, key, loader, policy, exc)
        raise
    _finished(rt, flight, key, loader, policy, outcome)
    return outcome


def _leader_gave_up(
    rt: Runtime, run: FlowRun, flight: Flight, key: str, loader: Loader, policy: Policy, exc: BaseException
) -> None:
    """The leader's await raised ``exc`` (the caller re-raises it). Cancelled: the caller gave up,
    the joiners have not, so a task finishes ``run`` for them (on aclose() the flight is abandoned
    and the loader stopped instead). Anything else ends the flight with that error."""
    if isinstance(exc, asyncio.CancelledError):
        if rt.closing:
            run.abort()
            rt.flights.finish(flight, error=FlightAborted("cache closed"))
        else:
            rt.track(asyncio.get_running_loop().create_task(_take_over(rt, run, flight, key, loader, policy)))
    elif isinstance(exc, Exception):
        rt.flights.finish(flight, error=exc)
    else:
        rt.flights.finish(flight, error=FlightAborted(repr(exc)))


async def _take_over(
    rt: Runtime, run: FlowRun, flight: Flight, key: str, loader: Loader, policy: Policy
) -> None:
    try:
        outcome: Outcome = await run.run()
    except Exception as exc:
        rt.flights.finish(flight, error=exc)
        return
    except BaseException as exc:  # cancelled again (loop shutting down, aclose): joiners start anew
        run.abort()
        rt.flights.finish(flight, error=FlightAborted(repr(exc)))
        raise
    _finished(rt, flight, key, loader, policy, outcome)


def _finished(
    rt: Runtime, flight: Flight, key: str, loader: Loader, policy: Policy, outcome: Outcome
) -> None:
    rt.flights.finish(flight, outcome)
    if outcome.source in (Source.STALE_SWR, Source.STALE_FAILSAFE):
        rt.emit(EventKind.STALE_SERVED, key, source=outcome.source)
    if outcome.refresh:
        start_refresh(rt, key, loader, policy, outcome.entry)


def start_refresh(rt: Runtime, key: str, loader: Loader, policy: Policy, current: Entry | None) -> None:
    """Refresh ``key`` in a background task, unless a flight for it is already running."""
    loop = asyncio.get_running_loop()
    flight, leader = rt.flights.join_or_lead(key, loop)
    if leader:
        rt.track(loop.create_task(_refresh(rt, flight, key, loader, policy, current)))


async def _refresh(
    rt: Runtime, flight: Flight, key: str, loader: Loader, policy: Policy, current: Entry | None
) -> None:
    try:
        await lead(rt, flight, key, loader, policy, current, refresh=True)
    except Exception as exc:  # nobody waits on a refresh; its failure is only logged
        logger.debug("background refresh of %s failed: %s", rt.log_key(key), rt.log_error(exc, key))


async def get_many_cached(
    rt: Runtime, keys: Sequence[str], load_many: Callable[..., Any], policy: Policy
) -> dict[str, Outcome]:
    """The async ``get_many_cached`` (see the sync driver's for the algorithm)."""
    if rt.bypass:
        values = load_many(list(keys))
        if inspect.isawaitable(values):
            values = await values
        return {k: Outcome(v, None, Source.LOADED) for k, v in values.items()}
    now = rt.clock()
    results: dict[str, Outcome] = {}
    stale: dict[str, Entry] = {}
    rt.coherence.ensure_started()
    for key in dict.fromkeys(keys):
        entry, i, best_stale = await l1_walk(rt, key, now)
        if best_stale is not None:
            stale[key] = best_stale
        if entry is not None:
            results[key] = Outcome(entry.value, entry, f"L{i + 1}", rt.names[i])
    missing = [k for k in dict.fromkeys(keys) if k not in results]
    loop = asyncio.get_running_loop()
    led: dict[str, Flight] = {}
    joined: dict[str, Flight] = {}
    for key in missing:
        flight, leader = rt.flights.join_or_lead(key, loop)
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
        run = FlowRun(rt, gen, load_many, policy, None)
        try:
            result: ManyResult = await run.run()
        except BaseException as exc:
            run.abort()
            finish_many(rt, led, _raise(exc))  # resolves the flights, re-raises
            raise
        finish_many(rt, led, lambda: result)
        results.update(result.outcomes)
    for key, flight in joined.items():
        await flight.wait_async()
        if flight.error is None:
            outcome: Outcome = flight.outcome
            results[key] = Outcome(outcome.value, outcome.entry, Source.JOINED, outcome.tier)
    return results


def _raise(exc: BaseException) -> Callable[[], Any]:
    def again() -> Any:
        raise exc

    return again


async def get(rt: Runtime, key: str, default: Any, conv: Converter | None, allow_stale: bool) -> Any:
    if rt.bypass:
        return default
    now = rt.clock()
    rt.coherence.ensure_started()
    entry, _, stale = await l1_walk(rt, key, now)
    if entry is not None:
        return entry.value
    for i in rt.remote:
        entry = await rt.read_async(i, key, conv)
        if entry is None:
            continue
        if now < entry.fresh_until:
            await rt.write_async(Write(range(i), key, entry, backfill=True))
            return entry.value
        if now < entry.stale_until and better_stale(entry, stale):
            stale = entry
    return stale.value if allow_stale and stale is not None else default


async def set_value(rt: Runtime, key: str, value: Any, policy: Policy) -> None:
    if rt.bypass:
        rt.codec.dumps(policy.new_entry(key, value, rt.clock()))  # still report bad values
        return
    rt.coherence.ensure_started()
    entry = new_entry(rt, key, value, policy)
    # A load of this key already running started before this write: it must not store its
    # (older) result, even in an L1 that has meanwhile evicted this entry.
    rt.coherence.invalidate_locally(key, entry.version, "mark")
    if await rt.write_async(Write(rt.plan.write_order, key, entry, backfill=False)) < 0:
        raise ValueTooLargeError(f"the value for {key!r} is too large for every tier")
    await rt.coherence.publish_async("set", (key,), (), entry.version, entry.created_at)


async def delete(rt: Runtime, key: str) -> None:
    version = next_version()
    rt.coherence.invalidate_locally(key, version, "delete")
    await rt.delete_async(key, version)
    await rt.coherence.publish_async("delete", (key,), (), version, rt.clock())


async def expire(rt: Runtime, key: str) -> None:
    version, at = next_version(), rt.clock()
    rt.coherence.invalidate_locally(key, version, "mark")
    await rt.expire_async(key, at, version)
    await rt.coherence.publish_async("expire", (key,), (), version, at)


async def invalidate_tags(rt: Runtime, tags: Sequence[str]) -> None:
    at = rt.clock()
    rt.coherence.invalidate_tags_locally(tags, at)
    await rt.store_tag_times_async(tags, at)
    await rt.coherence.publish_async("tags", (), tags, next_version(), at)


async def clear(rt: Runtime) -> None:
    version = next_version()
    await rt.clear_async(rt.coherence.prefix, version)
    await rt.coherence.publish_async("clear", (), (), version, rt.clock())
