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
from ._errors import ConfigurationError, LoaderTimeoutError
from ._events import EventKind
from ._flight import Flight, FlightAborted
from ._gateway import LeaseKeeper
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
    policy: Policy | None,
    fence: Flight | None,
    run: _Run | None = None,
) -> Any:
    """Drive ``gen`` to its outcome, doing each command with blocking calls. An error raised by
    a command is thrown into the flow (which releases its lease, ends its flight, re-raises).
    ``run`` is the flow's fence slot, when the flow was given it."""
    if run is None:
        run = _Run(fence)
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = gen.send(send) if error is None else gen.throw(error)
        except StopIteration as stop:
            return stop.value
        error = None
        try:
            send = _execute(rt, op, loader, policy, run)
        except BaseException as exc:
            error, send = exc, None


class _Run:
    """The state of one run of a flow: the flight it leads (its loads' fence), once it leads."""

    __slots__ = ("fence",)

    def __init__(self, fence: Flight | None) -> None:
        self.fence = fence


def _execute(rt: Runtime, cmd: Command, loader: Callable[..., Any], policy: Policy | None, run: _Run) -> Any:
    """Do one command with blocking calls (through the runtime's tier gateway)."""
    if rt.trace is not None:
        rt.trace.append(cmd)
    fence = run.fence
    match cmd:
        case Read():
            return rt.gw.read_sync(cmd.index, cmd.key, cmd.converter, cmd.count_miss)
        case Write():
            return rt.gw.write_sync(cmd)
        case Load():
            assert policy is not None  # only get_cached's flows load
            return _run_load(rt, cmd, loader, policy, fence)
        case AcquireLease():
            return rt.gw.acquire_lease_sync(cmd)
        case ReleaseLease():
            rt.gw.release_lease_sync(cmd)
            return None
        case WaitForEntry():
            return rt.gw.wait_for_entry_sync(cmd)
        case ReadMany():
            return rt.gw.read_many_sync(cmd.index, cmd.keys, cmd.converter)
        case WriteMany():
            rt.gw.write_many_sync(cmd.indices, cmd.items, cmd.fences, cmd.backfill)
            return None
        case LoadMany():
            return _load_many(rt, loader, cmd.keys)
        case DeleteAll():
            rt.gw.delete_sync(cmd.key, cmd.version)
            return None
        case ExpireAll():
            rt.gw.expire_sync(cmd.key, cmd.at, cmd.version)
            return None
        case ClearAll():
            rt.gw.clear_sync(cmd.prefix)
            return None
        case StoreTagTimes():
            rt.gw.store_tag_times_sync(cmd.tags, cmd.at)
            return None
        case Publish():
            rt.coherence.publish_sync(cmd.op, cmd.keys, cmd.tags, cmd.version, cmd.at)
            return None
        case Join():
            return _wait_joined(rt, cmd.flight, cmd.limit)
        case Refresh():
            assert policy is not None
            start_refresh(rt, cmd.key, loader, policy, cmd.current)
            return None
        case _:
            assert_never(cmd)


def _run_load(
    rt: Runtime, cmd: Load, loader: Callable[..., Any], policy: Policy, fence: Flight | None
) -> Any:
    """The loader under the policy's timeouts, with the lease kept alive by a thread meanwhile."""
    keeper = rt.gw.lease_keeper(fence.key if fence else "", cmd.lease, policy.lease_ttl)
    if keeper is not None:
        keeper.start()
    handed_over = False
    try:
        loaded = _load(rt, loader, policy, cmd.soft, cmd.hard, fence, cmd.lease, keeper)
        handed_over = loaded.soft_timed_out  # the late finisher stops the keeper
        return loaded
    finally:
        if keeper is not None and not handed_over:
            keeper.stop()


def _run_op(rt: Runtime, gen: Generator[Any, Any, Any]) -> Any:
    """Run one of the engine's operation flows (no loader involved)."""
    return run_flow(rt, gen, _no_loader, None, None)


def _no_loader(*_: Any) -> Any:
    raise AssertionError("this flow loads nothing")


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
    """Values for ``keys`` (full keys): one L1 pass here, the rest in the engine (one multi-key
    read per lower tier, one call of ``load_many``, keys others are loading joined)."""
    if rt.bypass:
        return {k: Outcome(v, None, Source.LOADED) for k, v in load_many(list(keys)).items()}
    now = rt.clock()
    results: dict[str, Outcome] = {}
    stale: dict[str, Entry] = {}
    unique = list(dict.fromkeys(keys))
    for key in unique:
        entry, i, best_stale, _ = rt.gw.l1_walk(key, now, rt.coherence.tags_valid_sync)
        take_l1(rt, key, (entry, i, best_stale), results, stale)
    flow = many_cached_flow(rt, unique, policy, results, stale, loop=None)
    done: dict[str, Outcome] = run_flow(rt, flow, load_many, policy, None)
    return done


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
    rt: Runtime,
    loader: Callable[[], Any],
    policy: Policy,
    soft: float | None,
    hard: float | None,
    fence: Flight | None,
    lease: tuple[int, str] | None = None,
    keeper: LeaseKeeper | None = None,
) -> LoadOutcome:
    key = fence.key if fence else ""
    started = rt.clock()
    t0 = time.perf_counter()
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
    if not box.done.wait(soft if soft is not None else hard):
        if soft is not None:
            # The caller gets stale now; the flight and the lease stay with the load (_Late).
            _Late(rt, box, policy, started, t0, fence, lease, keeper).start()
            return LoadOutcome(soft_timed_out=True, started_at=started)
        timeout = LoaderTimeoutError(f"loader did not finish within hard_timeout={hard}s")
        rt.emit(EventKind.LOAD_ERROR, key, duration=time.perf_counter() - t0, error=timeout)
        # The flight ends with the timeout; the result, if it ever comes, is still stored.
        _Late(rt, box, policy, started, t0, fence, None, None, owns_flight=False).start()
        return LoadOutcome(error=timeout, started_at=started)
    duration = time.perf_counter() - t0
    if box.error is not None:
        if not isinstance(box.error, Exception):
            raise box.error
        rt.emit(EventKind.LOAD_ERROR, key, duration=duration, error=box.error)
        return LoadOutcome(error=box.error, started_at=started, duration=duration)
    rt.emit(EventKind.LOAD, key, duration=duration)
    return LoadOutcome(box.value, started_at=started, duration=duration, context=ctx)


class _Late:
    """A sync load that outlived the caller's wait. Its result is stored when it arrives (fenced
    by the flight's version: a newer write or delete wins). After a soft timeout it also owns the
    flight (resolved with the late result, so no duplicate load starts meanwhile) and the lease
    (extended until the result is stored, then released); at ``hard_timeout`` it gives those up
    -- joiners get LoaderTimeoutError, the lease is released -- but still stores a late result."""

    def __init__(
        self,
        rt: Runtime,
        box: _Box,
        policy: Policy,
        started: float,
        t0: float,
        fence: Flight | None,
        lease: tuple[int, str] | None,
        keeper: LeaseKeeper | None,
        owns_flight: bool = True,
    ) -> None:
        self.rt, self.box, self.policy, self.fence = rt, box, policy, fence
        self.started, self.t0 = started, t0
        self.lease, self.keeper = lease, keeper
        self.owns_flight = owns_flight and fence is not None
        self._ended = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        hard = self.policy.hard_timeout
        if self.owns_flight and hard is not None:
            remaining = max(0.0, self.t0 + hard - time.perf_counter())
            self._timer = threading.Timer(remaining, self._end, args=(None,))
            self._timer.daemon = True
            self._timer.start()
        with self.box.lock:
            if not self.box.done.is_set():
                self.box.on_done = self._arrived
                return
        self._arrived(self.box)

    def _arrived(self, box: _Box) -> None:
        fence = self.fence
        outcome: Outcome | None = None
        if box.error is None and fence is not None:
            duration = time.perf_counter() - self.t0
            loaded = LoadOutcome(box.value, started_at=self.started, duration=duration, context=box.context)
            outcome = run_flow(
                self.rt, store_late(self.rt, fence, self.policy, loaded), _no_loader, None, fence
            )
        elif box.error is not None:
            where = fence.key if fence else ""
            logger.debug(
                "late loader for %s failed: %s",
                self.rt.log_key(where),
                self.rt.log_error(box.error, where),
            )
        self._end(outcome)

    def _end(self, outcome: Outcome | None) -> None:
        """Give up the flight and the lease (once): with the late outcome, or at hard_timeout."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        if self._timer is not None:
            self._timer.cancel()
        if self.keeper is not None:
            self.keeper.stop()
        if self.fence is not None:
            flow = end_late(
                self.rt, self.fence, self.policy, self.lease, self.owns_flight, outcome, self.box.error
            )
            run_flow(self.rt, flow, _no_loader, None, self.fence)


# --- the public operations ----------------------------------------------------------------


def _current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def get_cached(rt: Runtime, key: str, loader: Callable[[], Any], policy: Policy) -> Outcome:
    """The sync get_cached after key checks: the L1 walk here, the rest in the engine."""
    if rt.bypass:
        return Outcome(_call_loader(loader), None, Source.LOADED)
    now = rt.clock()
    entry, i, stale, _ = rt.gw.l1_walk(key, now, rt.coherence.tags_valid_sync)
    if entry is not None and not policy.early_refresh:  # the common hit, without a flow
        return Outcome(entry.value, entry, f"L{i + 1}", rt.names[i])
    run = _Run(None)
    flow = cached_flow(
        rt, key, policy, (entry, i, stale), now, loop=None, blocking_loop=_current_loop(), slot=run
    )
    outcome: Outcome = run_flow(rt, flow, loader, policy, None, run)
    return outcome


_ORPHAN_CHECK = 0.25  # how often a waiting joiner checks that its leader's event loop still runs


def _wait_joined(rt: Runtime, flight: Flight, limit: float | None) -> bool:
    """Wait for a joined flight; False if ``limit`` passed first. A flight whose leader's event
    loop closed (an ``asyncio.run`` that ended under it) is ended here with FlightAborted, so
    the caller starts anew instead of waiting forever."""
    deadline = None if limit is None else time.monotonic() + limit
    while True:
        if flight.orphaned and not flight.done:  # checked first: a dead flight costs no wait
            rt.flights.finish(flight, error=FlightAborted("its event loop closed"))
            return True
        step = (
            _ORPHAN_CHECK if deadline is None else min(_ORPHAN_CHECK, max(0.0, deadline - time.monotonic()))
        )
        if flight.wait_sync(step):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


def start_refresh(
    rt: Runtime, key: str, loader: Callable[[], Any], policy: Policy, current: Entry | None
) -> None:
    """Refresh ``key`` in a background thread, unless a flight for it is already running."""
    flight = refresh_flight(rt, key, None)
    if flight is None:
        return

    def refresh() -> None:
        try:
            flow = lead_flow(rt, flight, key, policy, current, refresh=True)
            run_flow(rt, flow, loader, policy, flight)
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
    entry, _, stale, _ = rt.gw.l1_walk(key, now, rt.coherence.tags_valid_sync)
    if entry is not None:
        return entry.value
    found, value = _run_op(rt, ops.get_flow(rt.plan, key, conv, stale, now, allow_stale))
    return value if found else default


def new_entry(rt: Runtime, key: str, value: Any, policy: Policy) -> Entry:
    entry = policy.new_entry(key, value, rt.clock(), version=next_version())
    rt.gw.prepare(entry, range(len(rt.tiers)))  # SerializationError before any tier is touched
    return entry


def set_value(rt: Runtime, key: str, value: Any, policy: Policy) -> None:
    if rt.bypass:
        rt.codec.dumps(policy.new_entry(key, value, rt.clock()))  # still report bad values
        return
    _run_op(rt, ops.set_flow(rt.coherence, rt.plan, key, new_entry(rt, key, value, policy)))


def delete(rt: Runtime, key: str) -> None:
    _run_op(rt, ops.delete_flow(rt.coherence, key, next_version(), rt.clock()))


def expire(rt: Runtime, key: str) -> None:
    _run_op(rt, ops.expire_flow(rt.coherence, key, next_version(), rt.clock()))


def invalidate_tags(rt: Runtime, tags: Sequence[str]) -> None:
    _run_op(rt, ops.tags_flow(rt.coherence, tags, next_version(), rt.clock()))


def clear(rt: Runtime) -> None:
    _run_op(rt, ops.clear_flow(rt.coherence, next_version(), rt.clock()))
