"""The async driver: runs the flow with awaited tier calls; flights run as tasks of their own."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any

from ._adaptive import LoadContext
from ._adaptive import _current as _current_load
from ._compat import assert_never
from ._engine import (
    AcquireLease,
    ClearAll,
    Command,
    DeleteAll,
    ExpireAll,
    Join,
    Load,
    LoadMany,
    LoadOutcome,
    Outcome,
    Publish,
    Read,
    ReadMany,
    Refresh,
    ReleaseLease,
    Source,
    StoreTagTimes,
    WaitForEntry,
    Write,
    WriteMany,
    ops,
)
from ._engine.cached import cached_flow, lead_flow, many_cached_flow, refresh_flight, take_l1
from ._engine.late import end_late, store_late
from ._entry import Entry, next_version
from ._errors import LoaderTimeoutError
from ._events import EventKind
from ._flight import Flight, FlightAborted
from ._gateway import LeaseKeeper
from ._policy import Policy
from ._runtime import Runtime
from ._serde import Converter
from ._sync import new_entry

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


_HAS_CANCELLING = sys.version_info >= (3, 11)


if sys.version_info >= (3, 11):

    def _cancel_requests(task: asyncio.Task[Any]) -> int:
        """How many cancels of ``task`` are pending (``Task.cancelling()``)."""
        return task.cancelling()

else:  # pragma: no cover - 3.10 awaits tier calls apart instead (see _apart)

    def _cancel_requests(task: asyncio.Task[Any]) -> int:
        return 0


async def _apart(call: Coroutine[Any, Any, Any]) -> Any:
    """Await a tier call so that a cancel of the caller always sticks.

    A tier client may swallow a cancel that arrives as its reply does (redis-py's ``wait_for`` on
    Python 3.10 and 3.11 returns the reply instead of raising). On 3.11+ the task still counts the
    request (``Task.cancelling()``), which ``FlowRun.run`` checks after each await. On 3.10 there
    is no such count: the call runs as a task of its own, awaited through ``asyncio.wait``, which
    never swallows the caller's cancel."""
    inner = asyncio.ensure_future(call)
    try:
        await asyncio.wait({inner})
    except asyncio.CancelledError:
        inner.cancel()
        raise
    return inner.result()


def _not_yet() -> Generator[Any, Any, Any]:
    raise AssertionError("FlowRun.gen was never set")
    yield


_NOT_YET = _not_yet()


class FlowRun:
    """One run of the flow, resumable: if the task driving it is cancelled mid-operation, the
    pending operation is kept and :meth:`run` can be called again (from another task) to redo it
    and go on. A loader already started is never called twice: its task is kept and re-awaited."""

    __slots__ = (
        "_context",
        "_done",
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
        gen: Generator[Any, Any, Any] | None,
        loader: Loader,
        policy: Policy | None,
        fence: Flight | None,
    ) -> None:
        self.rt = rt
        self.gen: Generator[Any, Any, Any] = gen if gen is not None else _NOT_YET  # see get_cached
        self.loader = loader
        self.policy = policy
        self.fence = fence
        self._pending: Command | None = None
        self._done: tuple[Any] | None = None  # the pending operation's result, kept across a cancel
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
        rt, gen = self.rt, self.gen
        # Cancels already pending when this run started are the caller's business, not ours.
        task = asyncio.current_task() if _HAS_CANCELLING else None
        base = _cancel_requests(task) if task is not None else 0
        while True:
            if self._pending is None:
                try:
                    self._pending = gen.send(send) if error is None else gen.throw(error)
                except StopIteration as stop:
                    return stop.value
            error = None
            op = self._pending
            if self._done is not None:  # done before a cancel we honoured: do not redo it
                (send,), self._done = self._done, None
                self._pending = None
                continue
            try:
                if type(op) is Read and not rt.tiers[op.index].in_process and rt.trace is None:
                    # The common case, without the dispatch coroutine in between.
                    call = rt.gw.read_async(op.index, op.key, op.converter, op.count_miss)
                else:
                    call = self._execute(op)
                send = await (call if task is not None else _apart(call))
            except asyncio.CancelledError:
                raise  # the operation stays pending: a resumed run redoes it
            except BaseException as exc:  # handed to the flow, which releases its lease and re-raises
                error, send = exc, None
            if task is not None and error is None and _cancel_requests(task) > base:
                # Cancelled during the await, but the tier client swallowed it (redis-py's
                # wait_for on 3.10/3.11): honour it. A resumed run takes the result as it is.
                self._done = (send,)
                raise asyncio.CancelledError
            self._pending = None

    async def _execute(self, cmd: Command) -> Any:
        """Do one command, awaited (through the runtime's tier gateway)."""
        rt = self.rt
        if rt.trace is not None:
            rt.trace.append(cmd)
        match cmd:
            case Read():
                if rt.tiers[cmd.index].in_process:
                    return rt.gw.read_sync(cmd.index, cmd.key, cmd.converter, cmd.count_miss)
                return await rt.gw.read_async(cmd.index, cmd.key, cmd.converter, cmd.count_miss)
            case Write():
                return await rt.gw.write_async(cmd)
            case Load():
                return await self._load(cmd.soft, cmd.hard, cmd.lease)
            case AcquireLease():
                return await rt.gw.acquire_lease_async(cmd)
            case ReleaseLease():
                await rt.gw.release_lease_async(cmd)
                return None
            case WaitForEntry():
                return await rt.gw.wait_for_entry_async(cmd)
            case ReadMany():
                return await rt.gw.read_many_async(cmd.index, cmd.keys, cmd.converter)
            case WriteMany():
                await rt.gw.write_many_async(cmd.indices, cmd.items, cmd.fences, cmd.backfill)
                return None
            case LoadMany():
                return await self._load_many(cmd.keys)
            case DeleteAll():
                await rt.gw.delete_async(cmd.key, cmd.version)
                return None
            case ExpireAll():
                await rt.gw.expire_async(cmd.key, cmd.at, cmd.version)
                return None
            case ClearAll():
                await rt.gw.clear_async(cmd.prefix)
                return None
            case StoreTagTimes():
                await rt.gw.store_tag_times_async(cmd.tags, cmd.at)
                return None
            case Publish():
                await rt.coherence.publish_async(cmd.op, cmd.keys, cmd.tags, cmd.version, cmd.at)
                return None
            case Join():
                return await wait_joined(rt, cmd.flight, cmd.limit)
            case Refresh():
                assert self.policy is not None
                start_refresh(rt, cmd.key, self.loader, self.policy, cmd.current)
                return None
            case _:
                assert_never(cmd)

    async def _load(
        self, soft: float | None, hard: float | None, lease: tuple[int, str] | None = None
    ) -> LoadOutcome:
        rt, policy = self.rt, self.policy
        assert policy is not None  # only get_cached's flows load
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
        first = soft if soft is not None else hard
        keeper = rt.gw.lease_keeper(key, lease, policy.lease_ttl)
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
        if soft is not None:
            # Soft timeout with something stale to serve: the load goes on, keeps the flight and
            # the lease (extended), stores its result, then resolves the flight and releases.
            rt.track(asyncio.get_running_loop().create_task(self._finish_late(task, lease, keeper)))
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

    async def _finish_late(
        self, task: asyncio.Future[Any], lease: tuple[int, str] | None, keeper: LeaseKeeper | None
    ) -> None:
        """After a soft timeout: wait (up to the hard timeout, extending the lease), then the
        engine stores the result, releases the lease and resolves the flight (``_engine.late``)."""
        rt, policy, fence = self.rt, self.policy, self.fence
        assert policy is not None
        hard = policy.hard_timeout
        outcome: Outcome | None = None
        error: BaseException | None = None
        try:
            while True:
                remaining = None if hard is None else max(0.0, self._load_t0 + hard - time.perf_counter())
                step = remaining
                if keeper is not None:
                    step = keeper.every if remaining is None else min(keeper.every, remaining)
                await asyncio.wait({task}, timeout=step)
                if task.done() or (remaining is not None and step == remaining):
                    break
                if keeper is not None and not await keeper.aextend():
                    keeper = None
            if not task.done():
                task.cancel()  # hard_timeout: an async loader is cancelled
            elif task.cancelled():
                error = LoaderTimeoutError("the loader was cancelled")
            elif task.exception() is not None:
                error = task.exception()
                where = fence.key if fence else ""
                logger.debug("late loader for %s failed: %s", rt.log_key(where), rt.log_error(error, where))
            elif fence is not None:
                duration = time.perf_counter() - self._load_t0
                loaded = LoadOutcome(
                    task.result(), started_at=self._load_started, duration=duration, context=self._context
                )
                outcome = await FlowRun(
                    rt, store_late(rt, fence, policy, loaded), _no_loader, None, fence
                ).run()
        except BaseException as exc:  # cancelled (loop closing): joiners start anew
            task.cancel()
            if fence is not None:
                rt.flights.finish(fence, error=FlightAborted(repr(exc)))
            raise
        finally:
            if fence is not None:
                flow = end_late(rt, fence, policy, lease, True, outcome, error)
                await FlowRun(rt, flow, _no_loader, None, fence).run()


# --- the public operations ----------------------------------------------------------------


async def l1_walk(rt: Runtime, key: str, now: float) -> tuple[Entry | None, int, Entry | None]:
    """``Runtime.l1_walk`` for async callers: tag times it does not know are fetched, awaited."""
    coherence = rt.coherence
    while True:
        entry, i, stale, unknown = rt.gw.l1_walk(key, now, coherence.tags_valid_locally)
        if unknown is None:
            return entry, i, stale
        await coherence.tags_valid_async(unknown)  # learns the times (or gives up) ...
        if coherence.tags_valid_locally(unknown) is None:  # ... the store was unreachable
            entry, i, stale, _ = rt.gw.l1_walk(key, now, coherence.known_valid)
            return entry, i, stale


async def get_cached(rt: Runtime, key: str, loader: Loader, policy: Policy) -> Outcome:
    """The async get_cached after key checks: the L1 walk here, the rest in the engine."""
    if rt.bypass:
        value = loader()
        if inspect.isawaitable(value):
            value = await value
        return Outcome(value, None, Source.LOADED)
    now = rt.clock()
    if rt.l1:
        entry, i, stale = await l1_walk(rt, key, now)
        if entry is not None and not policy.early_refresh:  # the common hit, without a flow
            return Outcome(entry.value, entry, f"L{i + 1}", rt.names[i])
    else:
        entry, i, stale = None, -1, None
    run = FlowRun(rt, None, loader, policy, None)
    run.gen = cached_flow(rt, key, policy, (entry, i, stale), now, loop=asyncio.get_running_loop(), slot=run)
    try:
        outcome: Outcome = await run.run()
    except asyncio.CancelledError:
        _leader_cancelled(rt, run)
        raise
    return outcome


_ORPHAN_CHECK = 0.25  # how often a joiner of another loop's flight checks that loop still runs


async def wait_joined(rt: Runtime, flight: Flight, limit: float | None) -> bool:
    """Wait for a joined flight; False if ``limit`` passed first. A flight whose leader's event
    loop closed is ended with FlightAborted (the caller starts anew) instead of awaited forever."""
    if flight.loop is asyncio.get_running_loop():  # our own loop cannot close under us
        return await flight.wait_async(limit)
    deadline = None if limit is None else time.monotonic() + limit
    while True:
        if flight.orphaned and not flight.done:  # checked first: a dead flight costs no wait
            rt.flights.finish(flight, error=FlightAborted("its event loop closed"))
            return True
        step = (
            _ORPHAN_CHECK if deadline is None else min(_ORPHAN_CHECK, max(0.0, deadline - time.monotonic()))
        )
        if await flight.wait_async(step):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def _leader_cancelled(rt: Runtime, run: FlowRun) -> None:
    """The caller was cancelled (it re-raises). If it led a flight, its joiners still wait: a
    task finishes the run for them -- the pending command redone, a started loader re-awaited,
    the flight resolved by the flow itself. On aclose() the flight is abandoned instead."""
    flight = run.fence
    if flight is None or flight.done:
        return  # a joiner only stops waiting
    if rt.closing:
        run.abort()
        rt.flights.finish(flight, error=FlightAborted("cache closed"))
    else:
        rt.track(asyncio.get_running_loop().create_task(_take_over(rt, run)))


async def _take_over(rt: Runtime, run: FlowRun) -> None:
    try:
        await run.run()
    except Exception:  # the flow ended its flight with it already
        return
    except BaseException as exc:  # cancelled again (loop shutting down, aclose): joiners start anew
        run.abort()
        if run.fence is not None:
            rt.flights.finish(run.fence, error=FlightAborted(repr(exc)))
        raise


def start_refresh(rt: Runtime, key: str, loader: Loader, policy: Policy, current: Entry | None) -> None:
    """Refresh ``key`` in a background task, unless a flight for it is already running."""
    loop = asyncio.get_running_loop()
    flight = refresh_flight(rt, key, loop)
    if flight is not None:
        rt.track(loop.create_task(_refresh(rt, flight, key, loader, policy, current)))


async def _refresh(
    rt: Runtime, flight: Flight, key: str, loader: Loader, policy: Policy, current: Entry | None
) -> None:
    """A background refresh. Cancelled, it is abandoned, never taken over: nobody awaits it, and
    its cancel usually means the loop is ending (``asyncio.run`` returning), where a new task
    would never run and the flight would never be resolved."""
    run = FlowRun(rt, lead_flow(rt, flight, key, policy, current, refresh=True), loader, policy, flight)
    try:
        await run.run()
    except asyncio.CancelledError:
        run.abort()
        rt.flights.finish(flight, error=FlightAborted("background refresh cancelled"))
        raise
    except Exception as exc:  # nobody waits on a refresh; its failure is only logged
        logger.debug("background refresh of %s failed: %s", rt.log_key(key), rt.log_error(exc, key))


async def get_many_cached(
    rt: Runtime, keys: Sequence[str], load_many: Callable[..., Any], policy: Policy
) -> dict[str, Outcome]:
    """The async ``get_many_cached``: one L1 pass here, the rest in the engine."""
    if rt.bypass:
        values = load_many(list(keys))
        if inspect.isawaitable(values):
            values = await values
        return {k: Outcome(v, None, Source.LOADED) for k, v in values.items()}
    now = rt.clock()
    results: dict[str, Outcome] = {}
    stale: dict[str, Entry] = {}
    unique = list(dict.fromkeys(keys))
    for key in unique:
        take_l1(rt, key, await l1_walk(rt, key, now), results, stale)
    loop = asyncio.get_running_loop()
    run = FlowRun(
        rt, many_cached_flow(rt, unique, policy, results, stale, loop=loop), load_many, policy, None
    )
    try:
        done: dict[str, Outcome] = await run.run()
    except asyncio.CancelledError:
        run.abort()  # stop the batch loader; closing the flow ends the flights it led
        run.gen.close()
        raise
    return done


async def _run_op(rt: Runtime, gen: Generator[Any, Any, Any]) -> Any:
    """Run one of the engine's operation flows (no loader involved)."""
    return await FlowRun(rt, gen, _no_loader, None, None).run()


def _no_loader(*_: Any) -> Any:
    raise AssertionError("this flow loads nothing")


async def get(rt: Runtime, key: str, default: Any, conv: Converter | None, allow_stale: bool) -> Any:
    if rt.bypass:
        return default
    now = rt.clock()
    rt.coherence.ensure_started()
    entry, _, stale = await l1_walk(rt, key, now)
    if entry is not None:
        return entry.value
    found, value = await _run_op(rt, ops.get_flow(rt.plan, key, conv, stale, now, allow_stale))
    return value if found else default


async def set_value(rt: Runtime, key: str, value: Any, policy: Policy) -> None:
    if rt.bypass:
        rt.codec.dumps(policy.new_entry(key, value, rt.clock()))  # still report bad values
        return
    await _run_op(rt, ops.set_flow(rt.coherence, rt.plan, key, new_entry(rt, key, value, policy)))


async def delete(rt: Runtime, key: str) -> None:
    await _run_op(rt, ops.delete_flow(rt.coherence, key, next_version(), rt.clock()))


async def expire(rt: Runtime, key: str) -> None:
    await _run_op(rt, ops.expire_flow(rt.coherence, key, next_version(), rt.clock()))


async def invalidate_tags(rt: Runtime, tags: Sequence[str]) -> None:
    await _run_op(rt, ops.tags_flow(rt.coherence, tags, next_version(), rt.clock()))


async def clear(rt: Runtime) -> None:
    await _run_op(rt, ops.clear_flow(rt.coherence, next_version(), rt.clock()))
