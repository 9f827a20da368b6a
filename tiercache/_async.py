"""The async driver: runs the flow with awaited tier calls; flights run as tasks of their own."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from ._entry import Entry, next_version
from ._errors import LoaderTimeoutError, ValueTooLargeError
from ._events import EventKind
from ._flight import Flight, FlightAborted
from ._flow import (
    NO_LEASE,
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
    fill_flow,
)
from ._policy import Policy
from ._runtime import Runtime
from ._serde import Converter
from ._sync import new_entry

__all__ = ["delete", "get", "get_cached", "run_flow", "set_value"]

logger = logging.getLogger("tiercache")

Loader = Callable[[], Any]


async def run_flow(
    rt: Runtime, gen: Generator[Operation, Any, Outcome], loader: Loader, policy: Policy, fence: Flight | None
) -> Outcome:
    """Drive ``gen`` to its outcome, awaiting each operation."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = gen.send(send) if error is None else gen.throw(error)
        except StopIteration as stop:
            outcome: Outcome = stop.value
            return outcome
        error = None
        try:
            send = await _execute(rt, op, loader, policy, fence)
        except BaseException as exc:  # handed to the flow, which releases its lease and re-raises
            error, send = exc, None


async def _execute(rt: Runtime, op: Operation, loader: Loader, policy: Policy, fence: Flight | None) -> Any:
    kind = type(op)
    if kind is Read:
        assert isinstance(op, Read)
        if rt.tiers[op.index].in_process:
            return rt.read_sync(op.index, op.key, op.converter)
        return await rt.read_async(op.index, op.key, op.converter)
    if kind is Write:
        assert isinstance(op, Write)
        return await rt.write_async(op)
    if kind is Load:
        assert isinstance(op, Load)
        return await _load(rt, loader, policy, op.has_stale, fence)
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
        rt.emit("lease_wait", op.key, rt.names[op.index], time.perf_counter() - started)
        return rt.typed(op.index, op.key, raw, op.converter)
    raise AssertionError(f"unknown operation {op!r}")


async def _load(
    rt: Runtime, loader: Loader, policy: Policy, has_stale: bool, fence: Flight | None
) -> LoadOutcome:
    key = fence.key if fence is not None else ""
    started = rt.clock()
    t0 = time.perf_counter()
    try:
        result = loader()
        if inspect.isawaitable(result):
            soft = policy.soft_timeout if (has_stale and policy.fail_safe) else None
            hard = policy.hard_timeout
            if soft is None and hard is None:
                value = await result
            else:
                timed = await _await_with_timeouts(rt, result, policy, soft, hard, started, t0, fence)
                if timed is None:
                    return LoadOutcome(soft_timed_out=True, started_at=started)
                value = timed[0]
        else:
            value = result
    except Exception as exc:
        rt.emit(EventKind.LOAD_ERROR, key, error=exc)
        return LoadOutcome(error=exc, started_at=started, duration=time.perf_counter() - t0)
    duration = time.perf_counter() - t0
    if rt.hook is not None:
        rt.emit(EventKind.LOAD, key, duration=duration)
    return LoadOutcome(value, started_at=started, duration=duration)


async def _await_with_timeouts(
    rt: Runtime,
    awaitable: Awaitable[Any],
    policy: Policy,
    soft: float | None,
    hard: float | None,
    started: float,
    t0: float,
    fence: Flight | None,
) -> tuple[Any] | None:
    """Await the loader under its timeouts: (value,) when it finished, None on a soft timeout
    (it goes on in the background and stores its result), LoaderTimeoutError on the hard one."""
    task: asyncio.Future[Any] = asyncio.ensure_future(awaitable)
    first = soft if soft is not None and (hard is None or soft < hard) else hard
    try:
        done, _ = await asyncio.wait({task}, timeout=first)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return (task.result(),)
    if first == soft and soft is not None:
        rt.track(asyncio.get_running_loop().create_task(_finish_late(rt, task, policy, started, t0, fence)))
        return None
    task.cancel()
    raise LoaderTimeoutError(f"loader did not finish within hard_timeout={hard}s; it was cancelled")


async def _finish_late(
    rt: Runtime, task: asyncio.Future[Any], policy: Policy, started: float, t0: float, fence: Flight | None
) -> None:
    """After a soft timeout: wait (up to the hard timeout) and store the result, fenced."""
    hard = policy.hard_timeout
    remaining = None if hard is None else max(0.0, t0 + hard - time.perf_counter())
    try:
        value = await asyncio.wait_for(task, remaining)
    except Exception as exc:  # the caller already got stale; a late failure is only logged
        logger.debug("tiercache: late loader for %r failed: %r", fence.key if fence else "", exc)
        return
    if fence is None:
        return
    loaded = LoadOutcome(value, started_at=started, duration=time.perf_counter() - t0)
    entry = rt.build_entry(fence.key, value, policy, loaded, fence.version)
    if entry is not None:
        await rt.write_async(Write(rt.plan.write_order, fence.key, entry, backfill=False, fence=fence))


# --- the public operations ----------------------------------------------------------------


async def get_cached(rt: Runtime, key: str, loader: Loader, policy: Policy) -> Any:
    """The async get_cached after key checks: L1 walk, then join or lead the flight."""
    now = rt.clock()
    stale: Entry | None = None
    tiers = rt.tiers
    for i in rt.l1:
        entry = tiers[i].get(key)
        if entry is not None:
            if now < entry.fresh_until:
                if i:
                    rt.write_sync(Write(range(i), key, entry, backfill=True))
                return entry.value
            if stale is None and now < entry.stale_until:
                stale = entry
    if stale is not None and policy.swr:
        rt.emit(EventKind.STALE_SERVED, key, Source.STALE_SWR)
        start_refresh(rt, key, loader, policy, stale)
        return stale.value
    return await fill(rt, key, loader, policy, stale)


async def fill(rt: Runtime, key: str, loader: Loader, policy: Policy, stale: Entry | None) -> Any:
    """Join the key's flight or lead a new one; the flight itself runs as its own task, so a
    cancelled caller (leader or not) only stops waiting."""
    loop = asyncio.get_running_loop()
    while True:
        flight, leader = rt.flights.join_or_lead(key, loop)
        if leader:
            rt.track(loop.create_task(lead(rt, flight, key, loader, policy, stale)))
        else:
            rt.emit(EventKind.JOIN, key)
        await flight.wait_async()
        if isinstance(flight.error, FlightAborted):
            continue
        outcome: Outcome = flight.result()
        return outcome.value


async def lead(
    rt: Runtime,
    flight: Flight,
    key: str,
    loader: Loader,
    policy: Policy,
    stale: Entry | None,
    refresh: bool = False,
) -> None:
    """Run the flow as this flight's leader and resolve the flight (never raises an Exception:
    the outcome or error goes to the flight's waiters)."""
    gen = fill_flow(
        rt.plan,
        key,
        policy,
        stale=stale,
        version=flight.version,
        fence=flight,
        refresh=refresh,
        build=rt.build_entry,
    )
    try:
        outcome = await run_flow(rt, gen, loader, policy, flight)
    except Exception as exc:
        rt.flights.finish(flight, error=exc)
        return
    except BaseException as exc:  # cancelled (loop shutting down, aclose): joiners start anew
        rt.flights.finish(flight, error=FlightAborted(repr(exc)))
        raise
    rt.flights.finish(flight, outcome)
    if outcome.source in (Source.STALE_SWR, Source.STALE_FAILSAFE):
        rt.emit(EventKind.STALE_SERVED, key, outcome.source)
    if outcome.refresh:
        start_refresh(rt, key, loader, policy, outcome.entry)


def start_refresh(rt: Runtime, key: str, loader: Loader, policy: Policy, current: Entry | None) -> None:
    """Refresh ``key`` in a background task, unless a flight for it is already running."""
    loop = asyncio.get_running_loop()
    flight, leader = rt.flights.join_or_lead(key, loop)
    if leader:
        rt.track(loop.create_task(lead(rt, flight, key, loader, policy, current, refresh=True)))


async def get(rt: Runtime, key: str, default: Any, conv: Converter | None, allow_stale: bool) -> Any:
    now = rt.clock()
    stale: Entry | None = None
    for i, tier in enumerate(rt.tiers):
        entry = tier.get(key) if tier.in_process else await rt.read_async(i, key, conv)
        if entry is None:
            continue
        if now < entry.fresh_until:
            if i:
                await rt.write_async(Write(range(i), key, entry, backfill=True))
            return entry.value
        if now < entry.stale_until and (stale is None or entry.version > stale.version):
            stale = entry
    if allow_stale and stale is not None:
        return stale.value
    return default


async def set_value(rt: Runtime, key: str, value: Any, policy: Policy) -> None:
    entry = new_entry(rt, key, value, policy)
    if await rt.write_async(Write(rt.plan.write_order, key, entry, backfill=False)) < 0:
        raise ValueTooLargeError(f"the value for {key!r} is too large for every tier")


async def delete(rt: Runtime, key: str) -> None:
    version = next_version()
    rt.flights.supersede(key)
    await rt.delete_async(key, version)
