"""Keeping L1 copies honest: tag checks on every read, and the bus that tells other processes.

Tag checks: an entry is invalid when its ``created_at`` is at or before the invalidation time of
any of its tags. Those times live in the first shared tier that is a ``TagStore`` (one hash per
namespace), are cached here for ``tag_refresh`` seconds, and are pushed forward by bus messages,
so the inline hit path can decide from memory; only an unknown or aged tag sends a caller to the
slow path, which fetches all the entry's tags in one round trip. Without a shared TagStore the
local times (and the bus) are the whole truth.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from ._bus import Bus, BusMessage
from ._entry import Entry, next_version
from ._events import EventKind
from ._flight import FlightRegistry
from ._tier import NamespaceClearingTier, Tier

__all__ = ["Coherence"]

logger = logging.getLogger("tiercache")


class Coherence:
    """Tag times and the invalidation bus of one cache."""

    def __init__(
        self,
        namespace: str,
        bus: Bus | None,
        tag_refresh: float,
        *,
        clock: Callable[[], float],
        flights: FlightRegistry,
        l1: Sequence[tuple[int, Tier]],
        tag_store: int | None,
        fetch_tag_times: Callable[[str, Sequence[str]], list[float | None] | None],
        afetch_tag_times: Callable[[str, Sequence[str]], Awaitable[list[float | None] | None]],
        emit: Callable[..., None],
        tier_failed: Callable[[int, str, BaseException, str], None],
        expire_in_process: Callable[[int, str, float, int], None],
    ) -> None:
        """Only its collaborators: the clock, the flight registry (its lock guards the floors),
        the in-process tiers by chain index, the shared tag store's index and the gateway's reads
        of it (None: it could not be asked), and the gateway's reporting and in-process expire."""
        self._clock = clock
        self._flights = flights
        self._l1 = tuple(l1)
        self._fetch_tag_times = fetch_tag_times
        self._afetch_tag_times = afetch_tag_times
        self._emit = emit
        self._tier_failed = tier_failed
        self._expire_in_process = expire_in_process
        self.namespace = namespace
        self.prefix = namespace + ":"
        self.bus = bus
        self.channel = f"tiercache:{namespace}"
        self.origin = uuid.uuid4().hex
        self.tag_refresh = tag_refresh
        # tag -> (invalidation time or None, when we learnt it)
        self.tag_times: dict[str, tuple[float | None, float]] = {}
        self.tag_store: int | None = tag_store
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._last_seq: dict[str, int] = {}
        self._last_seq_lock = threading.Lock()
        # key -> (lowest version L1 may still take, until when): raised by deletes and by other
        # processes' writes, so that a copy read from a shared tier just before an invalidation
        # cannot be written to L1 just after it. Guarded by the flight registry's lock.
        self._floors: dict[str, tuple[int, float]] = {}
        self.floor_seconds = 5.0
        # The same for the whole namespace, raised by clear() here or in another process, for
        # floor_seconds as well: long enough for reads that were on their way back during the
        # clear; short, because the version comes from the clearing process's clock.
        self._clear_floor = (0, 0.0)
        self._started = bus is None
        self._start_lock = threading.Lock()
        self._resets = 0

    # --- tags -------------------------------------------------------------------------------

    def tags_valid_locally(self, entry: Entry) -> bool | None:
        """True: valid; False: invalidated by a tag; None: a tag time is unknown or too old."""
        now = self._clock()
        remote = self.tag_store is not None
        for tag in entry.tags:
            item = self.tag_times.get(tag)
            if item is None:
                if remote:
                    return None
                continue
            at, learnt = item
            if remote and now - learnt > self.tag_refresh:
                return None
            if at is not None and entry.created_at <= at:
                return False
        return True

    def _learn(self, tags: Sequence[str], times: Sequence[float | None]) -> None:
        now = self._clock()
        for tag, at in zip(tags, times, strict=False):
            old = self.tag_times.get(tag)
            if old is not None and old[0] is not None and (at is None or old[0] > at):
                at = old[0]  # never move an invalidation time backwards
            self.tag_times[tag] = (at, now)

    def tags_valid_sync(self, entry: Entry) -> bool:
        valid = self.tags_valid_locally(entry)
        if valid is None and self.tag_store is not None:
            times = self._fetch_tag_times(entry.key, entry.tags)
            if times is None:  # the store is down: decide on what we know
                return self.known_valid(entry)
            self._learn(entry.tags, times)
            valid = self.tags_valid_locally(entry)
        return True if valid is None else valid

    async def tags_valid_async(self, entry: Entry) -> bool:
        valid = self.tags_valid_locally(entry)
        if valid is None and self.tag_store is not None:
            times = await self._afetch_tag_times(entry.key, entry.tags)
            if times is None:
                return self.known_valid(entry)
            self._learn(entry.tags, times)
            valid = self.tags_valid_locally(entry)
        return True if valid is None else valid

    def known_valid(self, entry: Entry) -> bool:
        """Decide on the tag times known so far (used when the tag store cannot be reached)."""
        for tag in entry.tags:
            item = self.tag_times.get(tag)
            if item is not None and item[0] is not None and entry.created_at <= item[0]:
                return False
        return True

    def invalidate_tags_locally(self, tags: Sequence[str], at: float) -> None:
        self._learn(tags, [at] * len(tags))

    # --- floors --------------------------------------------------------------------------------

    def admits(self, key: str, entry: Entry) -> bool:
        """May ``entry`` be written to L1? (Caller holds the flight registry's lock.)"""
        if entry.version < self._clear_floor[0] and self._clear_floor[1] >= time.monotonic():
            return False
        floor = self._floors.get(key)
        if floor is None:
            return True
        if floor[1] < time.monotonic():
            del self._floors[key]
            return True
        return entry.version >= floor[0]

    def raise_floor_locked(self, key: str, version: int) -> None:
        """(Caller holds the flight registry's lock.)"""
        now = time.monotonic()
        old = self._floors.get(key)
        if old is None or old[0] < version or old[1] < now:
            self._floors[key] = (
                max(version, old[0]) if old and old[1] >= now else version,
                now + self.floor_seconds,
            )
        if len(self._floors) > 10_000:
            for k in [k for k, (_, until) in self._floors.items() if until < now]:
                del self._floors[k]

    def cleared(self, version: int) -> None:
        """The namespace was cleared at ``version``: refuse older entries in L1 from now on, and
        mark running flights overtaken. The caller empties the tiers after this."""
        with self._flights.lock:
            until = time.monotonic() + self.floor_seconds
            self._clear_floor = (max(self._clear_floor[0], version), until)
        self._flights.supersede_prefix(self.prefix)

    def invalidate_locally(self, key: str, version: int, op: str, at: float = 0.0) -> None:
        """Raise the key's floor to ``version``, mark a running load superseded, then bring the
        L1 copies in line: ``set`` drops older copies (the writer's own entry may stay),
        ``delete`` drops every copy up to ``version``, ``expire`` marks them stale at ``at`` (kept
        for fail-safe), ``mark`` only sets the floor (the caller updates the tiers itself)."""
        with self._flights.lock:
            self.raise_floor_locked(key, version)
            self._flights.supersede_locked(key, version)
        if op == "mark":
            return
        for i, tier in self._l1:
            if op == "expire":
                self._expire_in_process(i, key, at, version)
            else:
                tier.delete(key, version - 1 if op == "set" else version)

    # --- the bus: sending ---------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Subscribe on first use (never at construction or import)."""
        if self._started:
            return
        with self._start_lock:
            if self._started or self.bus is None:
                return
            self._started = True
            self.bus.start(self.channel, self.on_message, self.on_reset)

    def publish_sync(
        self, op: str, keys: Sequence[str], tags: Sequence[str], version: int, at: float
    ) -> None:
        if self.bus is None:
            return
        self.ensure_started()
        with self._seq_lock:  # sequence and send in one step, so receivers see them in order
            self._seq += 1
            msg = BusMessage(
                self.namespace, op, tuple(keys), tuple(tags), version, at, self.origin, self._seq
            )
            try:
                self.bus.publish(self.channel, msg.encode())
            except Exception as exc:
                self._publish_failed(msg, exc)

    async def publish_async(
        self, op: str, keys: Sequence[str], tags: Sequence[str], version: int, at: float
    ) -> None:
        """As ``publish_sync``, from a worker thread: one lock orders every publish of this cache
        (all threads, all event loops), so receivers never see a false sequence gap."""
        if self.bus is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, functools.partial(self.publish_sync, op, keys, tags, version, at))

    def _publish_failed(self, msg: BusMessage, exc: Exception) -> None:
        # Receivers will see a sequence gap at our next message and clear their L1.
        logger.warning("publishing %s for namespace %s failed: %r", msg.op, msg.namespace, exc)
        self._emit(EventKind.TIER_ERROR, msg.keys[0] if msg.keys else "", None, error=exc)

    # --- the bus: receiving -------------------------------------------------------------------

    def on_message(self, data: bytes) -> None:
        msg = BusMessage.decode(data)
        if msg is None or msg.namespace != self.namespace or msg.origin == self.origin:
            return
        with self._last_seq_lock:
            last = self._last_seq.get(msg.origin)
            self._last_seq[msg.origin] = msg.seq
        if last is not None and msg.seq != last + 1:
            logger.info(
                "bus gap from %s (%s -> %s); clearing L1 of %s",
                msg.origin[:8],
                last,
                msg.seq,
                self.namespace,
            )
            self.cleared(next_version())  # what is on its way back may predate a lost message
            self.clear_local()
            self._emit(EventKind.BUS_GAP, "")
        self._emit(EventKind.BUS_MESSAGE, msg.keys[0] if msg.keys else "")
        self.apply(msg)

    def apply(self, msg: BusMessage) -> None:
        if msg.op in ("set", "delete", "expire"):
            for key in msg.keys:
                if key.startswith(self.prefix):
                    self.invalidate_locally(key, msg.version, msg.op, msg.at)
        elif msg.op == "tags":
            self._learn(msg.tags, [msg.at] * len(msg.tags))
        elif msg.op == "clear":
            self.cleared(msg.version)
            self.clear_local()

    def on_reset(self) -> None:
        """The transport (re)subscribed: anything may have been missed meanwhile."""
        self._resets += 1
        with self._last_seq_lock:
            self._last_seq.clear()
        if self._resets > 1:
            logger.info("bus reconnected; clearing L1 of %s", self.namespace)
            self._emit(EventKind.BUS_GAP, "")
            # Like clear(): a read or load on its way back must not land after the L1 clear.
            self.cleared(next_version())
        self.clear_local()

    def clear_local(self) -> None:
        """Empty the in-process tiers for this namespace and forget cached tag times."""
        for _, tier in self._l1:
            if isinstance(tier, NamespaceClearingTier):
                tier.clear(self.prefix)
        if self.tag_store is not None:
            self.tag_times.clear()
