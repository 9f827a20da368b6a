"""MemoryTier: the in-process L1, bounded by entry count and bytes, SIEVE eviction, lock-free reads.

Reads are a plain ``dict.get`` plus one attribute store (the SIEVE "visited" mark, kept as a
count of hits so that it doubles as the tier's hit counter): no lock, no list surgery, so threads
and the event loop can read at once. Writes and evictions take one lock.
SIEVE (Zhang et al., NSDI 2024) keeps a FIFO queue and a hand that sweeps from the oldest entry,
sparing (and un-marking) visited ones and evicting the first unvisited one; it matches or beats LRU
on web cache traces while letting hits stay lock-free. Expiry is checked on read; there are no
per-key timers.

The count is not an int: ``visited += 1`` allocates a new int on every hit once a hot key passes
256 hits, which measured 8-10 % of a decorated L1 hit. Instead each tier owns a ring of
preallocated marks (``_Mark``), and a hit moves the slot to the next one (``visited =
visited.next``); the ring's last mark hands its count to the tier when a hit moves past it.
"""

from __future__ import annotations

import enum
import itertools
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tiercache.tier import ConfigurationError, Duration, Entry, TierBinding, ValueTooLargeError, seconds

__all__ = ["MemoryTier", "estimate_size"]


_RING = 256  # marks per tier


class _Mark:
    """A slot's hits since the SIEVE hand last passed: ``count``, and ``next``, the mark one more
    hit moves it to. The tier's first mark (count 0) means "not visited"."""

    __slots__ = ("count", "next")
    count: int
    next: _Mark

    def __init__(self, count: int) -> None:
        self.count = count


class _LastMark(_Mark):
    """The ring's last mark: moving past it adds its count to the tier's total and starts again
    at count 1 (mark 0 stays reserved for "not visited")."""

    __slots__ = ("_tier",)

    def __init__(self, count: int, tier: MemoryTier) -> None:
        super().__init__(count)
        self._tier = tier

    @property
    def next(self) -> _Mark:  # type: ignore[override]  # read-only here: the lap ends
        tier = self._tier
        with tier._lock:
            tier._swept_hits += self.count
        return tier.marks[1]


def _ring(tier: MemoryTier) -> tuple[_Mark, ...]:
    marks = [_Mark(i) for i in range(_RING - 1)] + [_LastMark(_RING - 1, tier)]
    for mark, after in itertools.pairwise(marks):
        mark.next = after
    return tuple(marks)


class _Slot:
    """A queue node. ``newer``/``older`` link the FIFO; ``visited`` is SIEVE's mark, a ``_Mark``
    counting the hits since the hand last passed (``marks[0]``: not visited)."""

    __slots__ = ("entry", "key", "newer", "older", "size", "visited")

    def __init__(self, key: str, entry: Entry, size: int, unvisited: _Mark) -> None:
        self.key = key
        self.entry = entry
        self.size = size
        self.visited = unvisited
        self.newer: _Slot | None = None
        self.older: _Slot | None = None


class MemoryTier:
    """In-process tier. ``max_entries`` and ``max_bytes`` (an estimate, see ``estimate_size``)
    bound it; ``max_ttl`` caps how long any entry is kept here, whatever its own lifetime."""

    in_process = True
    shared = False

    def __init__(
        self,
        max_entries: int = 10_000,
        *,
        max_bytes: int | None = None,
        max_ttl: Duration | None = None,
        max_value_bytes: int | None = None,
        name: str = "memory",
        sizer: Callable[[Entry], int] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ConfigurationError("MemoryTier.max_entries must be at least 1")
        if max_bytes is not None and max_bytes < 1:
            raise ConfigurationError("MemoryTier.max_bytes must be positive")
        max_ttl = None if max_ttl is None else seconds(max_ttl, "MemoryTier.max_ttl")  # 30, "1h"...
        if max_ttl is not None and max_ttl <= 0:
            raise ConfigurationError("MemoryTier.max_ttl must be positive")
        self.name = name
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self.max_value_bytes = max_value_bytes if max_value_bytes is not None else max_bytes
        self._sizer = sizer if sizer is not None else estimate_size
        self._clock: Callable[[], float] = time.time
        # The dict is never rebound (the core's fast path keeps a reference to its ``get``).
        self._data: dict[str, _Slot] = {}
        # The decorator's inline hit path: slot lookup with no call into this object.
        self.fast_lookup: Callable[[str], _Slot | None] = self._data.get
        self._lock = threading.Lock()
        self._newest: _Slot | None = None
        self._oldest: _Slot | None = None
        self._hand: _Slot | None = None
        self._bytes = 0
        self._swept_hits = 0  # hits of slots the SIEVE hand has reset, that are gone, or spilled
        self.evictions = 0
        # The hit-count ring (see the module docstring). marks[1] is what a hit that is not
        # counted (metrics off) stores: visited, one hit.
        self.marks = _ring(self)
        self._unvisited = self.marks[0]

    def __repr__(self) -> str:
        return f"MemoryTier(name={self.name!r}, entries={len(self._data)}, max_entries={self.max_entries})"

    def __len__(self) -> int:
        return len(self._data)

    def hit_count(self) -> int:
        """Hits served by this tier so far, including those taken on the core's inline hit path.
        Exact for one thread or one event loop; threads hitting one key at once can lose a count
        (two moving a slot from the same mark), or at the ring's end add one lap twice."""
        return self._swept_hits + sum(slot.visited.count for slot in list(self._data.values()))

    @property
    def size_bytes(self) -> int:
        """The estimated bytes held now."""
        return self._bytes

    def bind(self, binding: TierBinding) -> None:
        self._clock = binding.clock

    # --- reads: no lock ---------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        slot = self._data.get(key)
        if slot is None:
            return None
        entry = slot.entry
        if entry.stale_until <= self._clock():
            self._drop(key, slot)
            return None
        slot.visited = slot.visited.next  # lock-free, see hit_count
        return entry

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        return [self.get(k) for k in keys]

    # --- writes: one lock -------------------------------------------------------------------

    def set(self, key: str, entry: Entry) -> None:
        now = self._clock()
        if self.max_ttl is not None:
            entry = entry.clamped(now + self.max_ttl)
        if entry.stale_until <= now:
            return
        size = self._sizer(entry)
        if self.max_value_bytes is not None and size > self.max_value_bytes:
            raise ValueTooLargeError(
                f"{self.name}: value for {key!r} is about {size} bytes; this tier takes at most "
                f"{self.max_value_bytes}"
            )
        with self._lock:
            slot = self._data.get(key)
            if slot is not None:
                if slot.entry.version > entry.version:
                    return  # a newer write is already here; a late result must not replace it
                self._bytes += size - slot.size
                slot.entry = entry
                slot.size = size
            else:
                slot = _Slot(key, entry, size, self._unvisited)
                self._push(slot)
                self._data[key] = slot
                self._bytes += size
            self._evict(keep=slot)

    def set_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        for key, entry in items:
            self.set(key, entry)

    def delete(self, key: str, version: int) -> None:
        with self._lock:
            slot = self._data.get(key)
            if slot is not None and slot.entry.version <= version:
                self._unlink(slot)

    def expire(self, key: str, at: float, version: int) -> None:
        """Mark the entry stale from ``at`` on (kept for fail-safe), under a new version."""
        with self._lock:
            slot = self._data.get(key)
            if slot is not None and slot.entry.version <= version:
                entry = slot.entry
                slot.entry = entry.replace(fresh_until=min(entry.fresh_until, at), version=version)

    async def aexpire(self, key: str, at: float, version: int) -> None:
        self.expire(key, at, version)

    async def aclear(self, prefix: str) -> int:
        return self.clear(prefix)

    def clear(self, prefix: str | None = None) -> int:
        """Remove every entry (or those whose key starts with ``prefix``); returns how many."""
        with self._lock:
            doomed = [s for k, s in self._data.items() if prefix is None or k.startswith(prefix)]
            for slot in doomed:
                self._unlink(slot)
            return len(doomed)

    def close(self) -> None:
        return None

    # --- async faces: the same calls, nothing to await ------------------------------------

    async def aget(self, key: str) -> Entry | None:
        return self.get(key)

    async def aget_many(self, keys: Sequence[str]) -> list[Entry | None]:
        return self.get_many(keys)

    async def aset(self, key: str, entry: Entry) -> None:
        self.set(key, entry)

    async def aset_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        self.set_many(items)

    async def adelete(self, key: str, version: int) -> None:
        self.delete(key, version)

    async def aclose(self) -> None:
        return None

    # --- the SIEVE queue (callers hold the lock) ------------------------------------------

    def _push(self, slot: _Slot) -> None:
        slot.older = self._newest
        slot.newer = None
        if self._newest is not None:
            self._newest.newer = slot
        self._newest = slot
        if self._oldest is None:
            self._oldest = slot

    def _unlink(self, slot: _Slot) -> None:
        if self._data.get(slot.key) is slot:
            del self._data[slot.key]
        else:
            return
        if self._hand is slot:
            self._hand = slot.newer
        if slot.newer is not None:
            slot.newer.older = slot.older
        else:
            self._newest = slot.older
        if slot.older is not None:
            slot.older.newer = slot.newer
        else:
            self._oldest = slot.newer
        slot.newer = slot.older = None
        self._bytes -= slot.size
        self._swept_hits += slot.visited.count

    def _evict(self, keep: _Slot) -> None:
        max_bytes = self.max_bytes
        while len(self._data) > self.max_entries or (max_bytes is not None and self._bytes > max_bytes):
            victim = self._sieve_victim(keep)
            if victim is None:
                return
            self._unlink(victim)
            self.evictions += 1

    def _sieve_victim(self, keep: _Slot) -> _Slot | None:
        hand = self._hand if self._hand is not None else self._oldest
        # Two full sweeps at most: the first clears every visited bit.
        for _ in range(2 * len(self._data) + 1):
            if hand is None:
                hand = self._oldest
                continue
            if hand.visited is not self._unvisited or hand is keep:
                self._swept_hits += hand.visited.count
                hand.visited = self._unvisited
                hand = hand.newer
                continue
            self._hand = hand.newer
            return hand
        return None

    def _drop(self, key: str, slot: _Slot) -> None:
        with self._lock:
            if self._data.get(key) is slot and slot.entry.stale_until <= self._clock():
                self._unlink(slot)


# Per-entry bytes besides the value: the Entry and _Slot objects are measured; this is the
# table space one more key costs in the tier's dict (amortised; measured with tracemalloc).
_DICT_SLOT_BYTES = 48
_SLOT_BYTES = sys.getsizeof(_Slot.__new__(_Slot)) + sys.getsizeof(2**20)  # the slot and its size int
_NOT_ALLOCATED = (type(None), bool, type, enum.Enum)  # singletons and classes: owned by nobody


def estimate_size(entry: Entry) -> int:
    """Bytes an entry holds in this process: its value walked in full (every object counted
    once, with ``sys.getsizeof``), the key, the tags, the encoded payload if it has one, and the
    Entry and slot objects themselves. Within 25 % of tracemalloc's count for nested values
    (tests/unit/test_memory_size.py); costs time proportional to the value, like encoding it."""
    seen: set[int] = set()
    size = _deep_size(entry.value, seen) + _deep_size(entry.key, seen) + _deep_size(entry.tags, seen)
    if entry.payload is not None:
        size += sys.getsizeof(entry.payload)
    return size + sys.getsizeof(entry) + _SLOT_BYTES + _DICT_SLOT_BYTES


def _deep_size(root: Any, seen: set[int]) -> int:
    total = 0
    stack = [root]
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        obj = pop()
        t = type(obj)
        if t is int:
            if -5 <= obj <= 256:  # cached by the interpreter
                continue
        elif isinstance(obj, _NOT_ALLOCATED):
            continue
        i = id(obj)
        if i in seen:
            continue
        seen.add(i)
        total += sys.getsizeof(obj, 64)
        if t is str or t is int or t is float or t is bytes:
            continue
        if isinstance(obj, dict):
            extend(obj.keys())
            extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            extend(obj)
        else:
            attrs = getattr(obj, "__dict__", None)
            if attrs is not None:
                push(attrs)
            for cls in t.__mro__:
                names = cls.__dict__.get("__slots__", ())
                for name in (names,) if isinstance(names, str) else names:
                    if name not in ("__dict__", "__weakref__"):
                        push(getattr(obj, name, None))
    return total
