"""Coherence floors: the lowest version L1 may still take, per key and for the whole namespace.

A floor is raised by a delete, by another process's write and by ``clear()``, and lasts
``seconds`` (long enough for reads that were on their way back during the invalidation). Every
floor lasts the same time and the clock does not go back, so the expiry order is the order in
which floors were last raised: an ``OrderedDict`` moved-to-end on each raise keeps the soonest to
expire at its front, and pruning pops from there, O(1) amortised per raise however many floors
are live. Memory is bounded: past ``capacity`` live floors the oldest ones are folded into the
namespace floor (refusing slightly more for a few seconds, never less).

Not thread-safe: the caller holds the flight registry's lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

__all__ = ["Floors"]


class Floors:
    """Per-key and namespace-wide version floors with a common lifetime."""

    __slots__ = ("_by_key", "_clock", "capacity", "ns", "seconds")

    def __init__(self, seconds: float, clock: Callable[[], float], capacity: int = 50_000) -> None:
        self.seconds = seconds
        self.capacity = capacity
        self._clock = clock
        # key -> (floor version, until); front = the soonest to expire (see the module doc)
        self._by_key: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.ns: tuple[int, float] = (0, 0.0)  # the namespace floor: (version, until)

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str) -> tuple[int, float] | None:
        return self._by_key.get(key)

    def admits(self, key: str, version: int) -> bool:
        now = self._clock()
        if version < self.ns[0] and self.ns[1] >= now:
            return False
        floor = self._by_key.get(key)
        if floor is None:
            return True
        if floor[1] < now:
            del self._by_key[key]
            return True
        return version >= floor[0]

    def raise_key(self, key: str, version: int) -> None:
        now = self._clock()
        by_key = self._by_key
        old = by_key.pop(key, None)
        if old is not None and old[1] >= now and old[0] > version:
            version = old[0]
        by_key[key] = (version, now + self.seconds)  # at the end: the latest to expire
        self._prune(now)

    def raise_all(self, version: int, seconds: float | None = None) -> None:
        """Refuse every version below ``version`` for ``seconds`` (default: the common lifetime)
        (a namespace clear)."""
        now = self._clock()
        keep, until = self.ns if self.ns[1] >= now else (0, 0.0)
        self.ns = (max(keep, version), max(until, now + (self.seconds if seconds is None else seconds)))

    def _prune(self, now: float) -> None:
        by_key = self._by_key
        while by_key:
            key = next(iter(by_key))
            if by_key[key][1] >= now:
                break
            del by_key[key]
        while len(by_key) > self.capacity:
            _, (version, until) = by_key.popitem(last=False)
            # Folded into the namespace floor: every key refuses below it as long as it lasted.
            keep = self.ns[0] if self.ns[1] >= now else 0
            self.ns = (max(keep, version), max(self.ns[1], until))
