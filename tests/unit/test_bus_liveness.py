"""Bus liveness in one process (issue 14): deafness, silent peers, goodbyes, per-origin state.

Real threads with a short liveness bound (0.2 s) over an in-process bus whose faults are switches.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any

from tiercache import TieredCache
from tiercache._bus_live import Origins
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeRemoteTier, LocalBus

LIVENESS = 0.2


class LiveBus(LocalBus):
    """A LocalBus that offers a liveness bound and can lose messages silently both ways."""

    liveness = LIVENESS

    def __init__(self, hub: dict[str, list[LocalBus]]) -> None:
        super().__init__(hub)
        self.hear = True  # False: deliveries to this bus vanish (a black-holed subscription)
        self.speak = True  # False: publishes vanish without an error

    def publish(self, channel: str, data: bytes) -> None:
        if self.speak:
            super().publish(channel, data)

    def _deliver(self, channel: str, data: bytes) -> None:
        if self.hear:
            super()._deliver(channel, data)


def pair() -> tuple[list[Any], list[MemoryTier], list[LiveBus]]:
    hub: dict[str, list[LocalBus]] = {}
    store: dict[str, Any] = {}
    l1 = [MemoryTier(), MemoryTier()]
    buses = [LiveBus(hub), LiveBus(hub)]
    caches = [
        TieredCache([l1[i], FakeRemoteTier(store)], namespace="lv", ttl=60, bus=buses[i]).sync
        for i in range(2)
    ]
    for c in caches:
        c._cache._rt.coherence.floor_seconds = LIVENESS  # (a gap's namespace floor lapses sooner)
        c.get("warm-up")  # subscribes; the heartbeat starts
    return caches, l1, buses


def until(condition: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)
    return time.monotonic() - start


def test_a_deaf_subscriber_stops_serving_old_values_within_the_bound() -> None:
    (a, b), (_, b_l1), (_, b_bus) = pair()
    try:
        a.set("k", "old")
        assert b.get("k") == "old" and b_l1.get("lv:k") is not None
        b_bus.hear = False  # from now on B hears nobody, not even itself; nothing raises
        a.set("k", "new")  # B misses this message
        took = until(lambda: b.get("k") == "new", 2 * LIVENESS)
        assert took <= LIVENESS
        coh = b._cache._rt.coherence
        assert coh.deaf and coh.l1_off
        b.get("k")
        assert b_l1.get("lv:k") is None  # L1 takes nothing while deaf
        b_bus.hear = True
        until(lambda: not coh.deaf, 5 * LIVENESS)
        time.sleep(LIVENESS * 1.2)  # the recovery floor lapses
        b.get("k")
        assert b_l1.get("lv:k") is not None
    finally:
        a.close()
        b.close()


def test_a_silent_peer_turns_l1_off_until_it_is_heard_again() -> None:
    (a, b), (_, b_l1), (a_bus, _) = pair()
    try:
        a.set("k", "old")
        assert b.get("k") == "old"
        time.sleep(LIVENESS / 2)  # B has heard A's beats
        a_bus.speak = False  # A's publishes vanish (its writes to the shared tier still succeed)
        a.set("k", "new")
        took = until(lambda: b.get("k") == "new", 2 * LIVENESS)
        assert took <= LIVENESS
        a.set("k", "newer")  # still lost, but B no longer keeps anything in L1
        assert b.get("k") == "newer" and b_l1.get("lv:k") is None
        a_bus.speak = True
        coh = b._cache._rt.coherence
        until(lambda: not coh.l1_off, 5 * LIVENESS)
    finally:
        a.close()
        b.close()


def test_a_peer_that_closes_says_goodbye_and_leaves_no_doubt() -> None:
    (a, b), _, _ = pair()
    try:
        time.sleep(LIVENESS / 2)
        a.close()
        time.sleep(LIVENESS * 1.5)
        coh = b._cache._rt.coherence
        assert not coh.l1_off and not coh.origins.missing
    finally:
        b.close()


def test_heartbeat_threads_end_with_the_cache() -> None:
    before = {t for t in threading.enumerate() if t.name.startswith("tiercache-bus")}
    caches, _, _ = pair()
    caches[0].close()  # closed: its threads stop
    caches.clear()  # the other is dropped without close(): its threads end once it is collected
    _ = None
    gc.collect()
    until(lambda: {t for t in threading.enumerate() if t.name.startswith("tiercache-bus")} <= before, 2)


def test_origins_are_bounded_and_classify_sequences() -> None:
    o = Origins(capacity=3)
    assert o.observe("a", 1, 0.0, True) == "first"
    assert o.observe("a", 2, 0.0, True) == "next"
    assert o.observe("a", 2, 0.0, True) == "late"  # a replay or duplicate: no gap, no state change
    assert o.observe("a", 5, 0.0, True) == "gap"
    for i in range(10):
        o.observe(f"x{i}", 1, 0.0, False)
    assert len(o) == 3
    assert o.silent(10.0, 1.0, 5.0) == []  # "a" was dropped by capacity, the others never beat
    o.observe("b", 1, 10.0, True)
    assert o.silent(12.0, 1.0, 5.0) == ["b"] and o.any_missing(12.0)
    assert o.observe("b", 2, 12.5, True) == "gap"  # back: whatever it sent meanwhile is lost
    assert not o.any_missing(12.5)
    # A peer that vanished without a goodbye (crashed) keeps L1 off for 5 x liveness after it
    # was last heard, then is forgotten.
    o.observe("c", 1, 20.0, True)
    assert o.silent(21.5, 1.0, 5.0) == ["b", "c"]  # b went quiet too
    assert o.any_missing(24.9) and not o.any_missing(25.1)
