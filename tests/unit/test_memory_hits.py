"""MemoryTier's hit count rides on the SIEVE mark (a ring of preallocated marks, see
adapters/memory.py): exact across laps of the ring on every hit path, and still SIEVE's mark."""

from __future__ import annotations

import asyncio
import time

import pytest

from tiercache import TieredCache, tiered_cache
from tiercache.adapters.memory import _RING, MemoryTier
from tiercache.testing import make_entry

LAPS = 3 * _RING + 17  # several times round the ring, and partway into the next lap


def test_tier_reads_count_every_hit_across_laps() -> None:
    tier = MemoryTier()
    tier.set("k", make_entry("k", 1, time.time()))
    for _ in range(LAPS):
        assert tier.get("k") is not None
    assert tier.get("missing") is None
    assert tier.hit_count() == LAPS


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_decorator_hits_are_counted_with_metrics_on(use_async: bool) -> None:
    cache = TieredCache([MemoryTier()], namespace="h", ttl=60)
    if use_async:

        @tiered_cache(cache, key="n:{n}")
        async def afetch(n: int) -> int:
            return n

        async def run() -> None:
            for _ in range(LAPS + 1):  # the first call loads
                assert await afetch(7) == 7

        asyncio.run(run())
    else:

        @tiered_cache(cache, key="n:{n}")
        def fetch(n: int) -> int:
            return n

        for _ in range(LAPS + 1):
            assert fetch(7) == 7
    assert cache.stats.tier_hits(0) == LAPS


def test_get_cached_inline_hits_are_counted() -> None:
    cache = TieredCache([MemoryTier()], namespace="h", ttl=60)
    for _ in range(LAPS + 1):
        assert cache.sync.get_cached("k", lambda: "v") == "v"
    assert cache.stats.tier_hits(0) == LAPS


def test_metrics_off_marks_visited_without_counting() -> None:
    tier = MemoryTier(max_entries=2)
    cache = TieredCache([tier], namespace="h", ttl=60, metrics=False)

    @tiered_cache(cache, key="n:{n}")
    def fetch(n: int) -> int:
        return n

    fetch(1)
    fetch(2)
    for _ in range(_RING + 5):
        fetch(1)  # hits: visited, not counted
    assert tier.hit_count() == 1  # the "visited" mark reads as one hit, however many there were
    fetch(3)  # full: SIEVE spares the visited entry 1 and evicts 2
    assert tier.get("h:n:1") is not None and tier.get("h:n:2") is None


def test_sweeps_keep_the_count_of_marks_they_reset() -> None:
    tier = MemoryTier(max_entries=2)
    tier.set("a", make_entry("a", 1, time.time()))
    tier.set("b", make_entry("b", 2, time.time()))
    for _ in range(_RING + 3):
        tier.get("a")
    tier.set("c", make_entry("c", 3, time.time()))  # the hand resets a's mark, evicts b
    assert tier.get("b") is None and tier.hit_count() == _RING + 3
