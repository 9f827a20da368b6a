"""One scenario table through both drivers and the decorator's inline hit path: same answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tiercache import Lookup, TieredCache, tiered_cache
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier


class Down(Exception):
    pass


@dataclass
class World:
    clock: FakeClock
    l1: MemoryTier
    l2: FakeRemoteTier
    cache: TieredCache


def new_world() -> World:
    clock = FakeClock()
    l1, l2 = MemoryTier(), FakeRemoteTier()
    return World(clock, l1, l2, TieredCache([l1, l2], clock=clock, ttl=10, stale_ttl=100, namespace="p"))


def _cold(w: World) -> None:
    return None


def _in_l1(w: World) -> None:
    w.cache.sync.set("k", "cached")


def _only_in_l2(w: World) -> None:
    w.cache.sync.set("k", "cached")
    w.l1.clear()


def _stale(w: World) -> None:
    w.cache.sync.set("k", "cached")
    w.clock.advance(20)


def _dead(w: World) -> None:
    w.cache.sync.set("k", "cached")
    w.clock.advance(500)


# (name, setup, loader fails?, swr, expected value, expected source, loader calls)
SCENARIOS: list[tuple[str, Callable[[World], None], bool, bool, Any, str, int]] = [
    ("cold", _cold, False, False, "loaded", "LOADED", 1),
    ("l1 hit", _in_l1, False, False, "cached", "L1", 0),
    ("l2 hit", _only_in_l2, False, False, "cached", "L2", 0),
    ("stale, loader ok", _stale, False, False, "loaded", "LOADED", 1),
    ("stale, loader fails", _stale, True, False, "cached", "STALE_FAILSAFE", 1),
    ("stale, swr", _stale, False, True, "cached", "STALE_SWR", None),
    ("dead, loader ok", _dead, False, False, "loaded", "LOADED", 1),
]


def _loader(fails: bool, calls: list[int]) -> Callable[[], str]:
    def load() -> str:
        calls.append(1)
        if fails:
            raise Down
        return "loaded"

    return load


@pytest.mark.parametrize(
    ("name", "setup", "fails", "swr", "value", "source", "loads"), SCENARIOS, ids=[s[0] for s in SCENARIOS]
)
@pytest.mark.parametrize("driver", ["sync", "async", "decorator-sync", "decorator-async"])
def test_scenario(
    driver: str,
    name: str,
    setup: Callable[[World], None],
    fails: bool,
    swr: bool,
    value: Any,
    source: str,
    loads: int | None,
) -> None:
    w = new_world()
    setup(w)
    calls: list[int] = []
    load = _loader(fails, calls)
    if driver == "sync":
        got: Lookup = w.cache.sync.lookup("k", load, swr=swr)
        assert (got.value, got.source) == (value, source)
    elif driver == "async":

        async def main() -> Lookup:
            result = await w.cache.lookup("k", load, swr=swr)
            await w.cache.aclose()
            return result

        got = asyncio.run(main())
        assert (got.value, got.source) == (value, source)
    elif driver == "decorator-sync":
        fn = tiered_cache(w.cache, key="k", swr=swr)(lambda: load())
        assert fn() == value
        w.cache.sync.close()
    else:

        async def aload() -> str:
            return load()

        afn = tiered_cache(w.cache, key="k", swr=swr)(aload)

        async def amain() -> Any:
            result = await afn()
            await w.cache.aclose()
            return result

        assert asyncio.run(amain()) == value
    if loads is not None:
        assert len(calls) == loads
    if source in ("L2",):  # back-filled: the next call is an L1 hit
        assert w.cache.sync.lookup("k", load).source == "L1"


def test_joined_callers_report_joined() -> None:
    w = new_world()

    async def slow() -> str:
        await asyncio.sleep(0.05)
        return "v"

    async def main() -> list[str]:
        results = await asyncio.gather(*(w.cache.lookup("k", slow) for _ in range(5)))
        return sorted(r.source for r in results)

    assert asyncio.run(main()) == ["JOINED"] * 4 + ["LOADED"]
