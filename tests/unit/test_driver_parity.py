"""Driver parity: the sync and async drivers execute the same commands, in the same order, for the
same scenario (the engine decides; the drivers only do). Traces, not only outcomes, are compared."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from tiercache import LoaderTimeoutError, TieredCache
from tiercache._entry import Entry
from tiercache._flight import Flight
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier

NOW = 1_000_000.0


def _norm(value: Any) -> Any:
    if isinstance(value, Entry):
        return ("entry", value.key, value.value)
    if isinstance(value, Flight):
        return "flight"
    if isinstance(value, range):
        return tuple(value)
    if isinstance(value, dict):
        return tuple(sorted((k, _norm(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    if isinstance(value, float):
        return "t"
    if isinstance(value, int) and not isinstance(value, bool) and value > 10**12:
        return "version"
    if isinstance(value, str) and value.startswith("lease-"):
        return "token"
    return value


def normalised(trace: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (type(cmd).__name__, *(_norm(getattr(cmd, f.name)) for f in dataclasses.fields(cmd))) for cmd in trace
    ]


class World:
    """One cache (memory over a leased remote), its clock and its remote, for one driver."""

    def __init__(self) -> None:
        self.clock = FakeClock(start=NOW)
        self.remote = FakeRemoteTier(leases=True)
        self.l1 = MemoryTier()
        self.cache = TieredCache(
            [self.l1, self.remote], clock=self.clock, ttl=10, stale_ttl=100, auto_batch=False, namespace="p"
        )
        self.cache._rt.trace = []

    def settle(self) -> None:
        deadline = time.monotonic() + 5
        rt = self.cache._rt
        while (rt.threads or rt.tasks) and time.monotonic() < deadline:
            time.sleep(0.01)


Step = tuple[str, tuple[Any, ...], dict[str, Any]]


def run_sync(world: World, steps: list[Step]) -> list[Any]:
    out = []
    for method, args, kwargs in steps:
        if method == "advance":
            world.clock.advance(args[0])
            continue
        if method == "drop_l1":
            world.l1.clear("p:")
            continue
        if method == "remote_down":
            world.remote.down = args[0]
            continue
        call = getattr(world.cache.sync, method)
        args = tuple(a.sync if isinstance(a, Loader) else a for a in args)
        try:
            out.append(call(*args, **kwargs))
        except Exception as exc:
            out.append(type(exc).__name__)
        world.settle()
    return out


def run_async(world: World, steps: list[Step]) -> list[Any]:
    async def main() -> list[Any]:
        out = []
        for method, args, kwargs in steps:
            if method == "advance":
                world.clock.advance(args[0])
                continue
            if method == "drop_l1":
                world.l1.clear("p:")
                continue
            if method == "remote_down":
                world.remote.down = args[0]
                continue
            call = getattr(world.cache, method)
            call_args = tuple(a.aio if isinstance(a, Loader) else a for a in args)
            try:
                out.append(await call(*call_args, **kwargs))
            except Exception as exc:
                out.append(type(exc).__name__)
            for task in list(world.cache._rt.tasks):
                await asyncio.wait({task}, timeout=5)
        return out

    return asyncio.run(main())


class Loader:
    """The same loader for both drivers: a sync function and its async twin."""

    def __init__(self, value: Any = None, error: Exception | None = None, delay: float = 0.0) -> None:
        self.value, self.error, self.delay = value, error, delay

    def sync(self, *_: Any) -> Any:
        if self.delay:
            time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.value

    async def aio(self, *_: Any) -> Any:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.value


def many(values: dict[str, Any]) -> Loader:
    return Loader(values)  # the batch loader gets and returns the caller's keys


SCENARIOS: dict[str, list[Step]] = {
    "cold load, then the inline L1 hit": [
        ("get_cached", ("k", Loader("v")), {}),
        ("get_cached", ("k", Loader("x")), {}),
    ],
    "shared hit back-filled": [
        ("set", ("k", "shared"), {}),
        ("drop_l1", (), {}),
        ("get_cached", ("k", Loader("x")), {}),
    ],
    "lease taken, loader fails, fail-safe throttles": [
        ("set", ("k", "old"), {}),
        ("advance", (20,), {}),
        ("drop_l1", (), {}),
        ("get_cached", ("k", Loader(error=RuntimeError("down"))), {}),
    ],
    "loader fails without stale": [
        ("get_cached", ("k", Loader(error=RuntimeError("down"))), {}),
    ],
    "hard timeout": [
        ("get_cached", ("k", Loader("late", delay=0.3)), {"hard_timeout": 0.05}),
    ],
    "soft timeout answers stale": [
        ("set", ("k", "old"), {}),
        ("advance", (20,), {}),
        ("drop_l1", (), {}),
        ("get_cached", ("k", Loader("new", delay=0.2)), {"soft_timeout": 0.05}),
    ],
    "tier errors are misses": [
        ("remote_down", (True,), {}),
        ("get_cached", ("k", Loader("v")), {}),
        ("remote_down", (False,), {}),
    ],
    "swr serves stale and refreshes": [
        ("set", ("k", "old"), {}),
        ("advance", (20,), {}),
        ("get_cached", ("k", Loader("new")), {"swr": True}),
    ],
    "set, get, expire, delete": [
        ("set", ("k", "v"), {}),
        ("get", ("k",), {}),
        ("expire", ("k",), {}),
        ("get", ("k",), {"allow_stale": True}),
        ("delete", ("k",), {}),
        ("get", ("k",), {}),
    ],
    "tags and clear": [
        ("set", ("k", "v"), {"tags": ["t"]}),
        ("invalidate_tags", ("t",), {}),
        ("get", ("k",), {}),
        ("clear", (), {}),
    ],
    "get_many_cached": [
        ("set", ("a", 1), {}),
        ("drop_l1", (), {}),
        ("get_many_cached", (["a", "b"], many({"b": 2})), {}),
        ("get_many_cached", (["a", "b", "c"], many({"c": 3})), {}),
    ],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_both_drivers_execute_the_same_commands(name: str) -> None:
    steps = SCENARIOS[name]
    sync_world, async_world = World(), World()
    sync_out = run_sync(sync_world, steps)
    async_out = run_async(async_world, steps)
    assert sync_out == async_out
    sync_trace = normalised(sync_world.cache._rt.trace or [])
    async_trace = normalised(async_world.cache._rt.trace or [])
    assert sync_trace == async_trace
    assert sync_trace or name.startswith("nothing")  # every scenario does some I/O


def test_the_inline_l1_hit_executes_no_command() -> None:
    for runner in (run_sync, run_async):
        world = World()
        runner(world, [("get_cached", ("k", Loader("v")), {})])
        assert world.cache._rt.trace
        world.cache._rt.trace = []
        assert runner(world, [("get_cached", ("k", Loader("x")), {})]) == ["v"]
        assert world.cache._rt.trace == []


def _kinds(trace: list[Any]) -> list[str]:
    return [type(c).__name__ for c in trace]


def test_a_hard_timeout_trace_releases_the_lease() -> None:
    world = World()
    assert run_sync(world, [("get_cached", ("k", Loader("late", delay=0.3)), {"hard_timeout": 0.05})]) == [
        LoaderTimeoutError.__name__
    ]
    kinds = _kinds(world.cache._rt.trace or [])
    assert kinds[:3] == ["Read", "AcquireLease", "Read"]
    assert kinds[3] == "Load" and "ReleaseLease" in kinds[4:]


def test_a_cancelled_async_leader_is_taken_over_with_the_same_commands() -> None:
    """Cancellation exists only for async callers: a leader cancelled mid-load hands its run to a
    take-over task, which redoes the interrupted command (re-awaiting the same loader) and goes on
    exactly as an uncancelled leader would -- the sync driver's trace, one repeated Load aside."""
    sync_world, async_world = World(), World()
    assert run_sync(sync_world, [("get_cached", ("k", Loader("v", delay=0.2)), {})]) == ["v"]
    calls = 0

    async def slow() -> Any:  # annotated as the sync side's loader is (annotations pick a converter)
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        return "v"

    async def main() -> Any:
        cache = async_world.cache
        leader = asyncio.create_task(cache.get_cached("k", slow))
        await asyncio.sleep(0.05)
        joiner = asyncio.create_task(cache.get_cached("k", slow))
        await asyncio.sleep(0.01)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        return await asyncio.wait_for(joiner, 2)

    assert asyncio.run(main()) == "v"
    assert calls == 1  # the take-over re-awaited the loader, never called it again
    traced = normalised(async_world.cache._rt.trace or [])
    assert [c[0] for c in traced].count("Join") == 1  # the joiner's wait
    leader_trace = [c for c in traced if c[0] != "Join"]
    loads = [i for i, c in enumerate(leader_trace) if c[0] == "Load"]
    assert len(loads) == 2 and loads[1] == loads[0] + 1  # the interrupted Load, redone once
    del leader_trace[loads[1]]
    assert leader_trace == normalised(sync_world.cache._rt.trace or [])


def test_an_unknown_command_is_an_assertion_in_both_drivers() -> None:
    """The async driver's old WaitForEntry tail sat outside its branch: an unknown operation raised
    UnboundLocalError. Both drivers now end their exhaustive match with an AssertionError."""
    from tiercache import _async, _sync

    rt = World().cache._rt
    with pytest.raises(AssertionError):
        _sync._execute(rt, object(), Loader().sync, None, _sync._Run(None))  # type: ignore[arg-type]

    async def main() -> None:
        run = _async.FlowRun(rt, None, Loader().aio, None, None)
        await run._execute(object())  # type: ignore[arg-type]

    with pytest.raises(AssertionError):
        asyncio.run(main())
