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
import math
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._bus import Bus, BusMessage
from ._bus_live import Gone, Origins, Pulse, watch_process
from ._bus_wire import MAX_SKEW, BusWire, split_keys
from ._entry import Entry, next_version
from ._events import EventKind
from ._flight import FlightRegistry
from ._floors import Floors
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
        codec: Any = None,
        shared: Sequence[Tier] = (),
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
        self.channel = bus_channel(shared, namespace, bus)
        self.origin = uuid.uuid4().hex
        self.tag_refresh = tag_refresh
        # tag -> (invalidation time or None, when we learnt it); least recently learnt first,
        # at most tag_capacity tags: the ones dropped are folded into _tag_floor (see _learn).
        self.tag_times: OrderedDict[str, tuple[float | None, float]] = OrderedDict()
        self.tag_capacity = 100_000
        self._tag_floor: float | None = None
        self._tags_lock = threading.Lock()
        self.tag_store: int | None = tag_store
        # Every received message is validated (and authenticated with a SignedCodec) here.
        self.wire = BusWire(self.channel, codec, clock)
        self._seq = 0
        self._seq_lock = threading.Lock()
        self.origins = Origins()
        self._last_seq_lock = threading.Lock()  # guards origins
        # Per key and for the whole namespace: the lowest version L1 may still take, for a few
        # seconds: raised by deletes, other processes' writes and clear() (here or elsewhere), so
        # that a copy read from a shared tier just before an invalidation cannot be written to L1
        # just after it. Guarded by the flight registry's lock. See tiercache._floors.
        self._floors = Floors(5.0, time.monotonic)
        # Liveness (tiercache._bus_live): heartbeats when the bus offers a bound.
        live = getattr(bus, "liveness", None)
        self.liveness: float | None = float(live) if isinstance(live, (int, float)) and live > 0 else None
        self._pulse: Pulse | None = None
        self._heard_self = 0.0  # monotonic time we last heard one of our own messages
        self._publish_logged_at = -math.inf
        self._subscribed = False  # on_reset ran at least once
        self.deaf = False  # our own messages stopped coming back: we may miss the others' too
        self._doubt = False  # an origin went silent without a goodbye
        self.l1_off = False  # deaf or in doubt: L1 takes nothing
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
        return True if self._tag_floor is None else self._above_tag_floor(entry)

    def _above_tag_floor(self, entry: Entry) -> bool:
        """Past tag_capacity tags, tags we forgot count as invalidated at the latest time we
        forgot: more reloads, never an entry that was invalidated."""
        floor = self._tag_floor
        if floor is None or entry.created_at > floor:
            return True
        return all(tag in self.tag_times for tag in entry.tags)

    def _learn(self, tags: Sequence[str], times: Sequence[float | None]) -> None:
        now = self._clock()
        known = self.tag_times
        # One writer at a time, so that a time is never lowered by a racing writer; readers take
        # no lock and always find the tag (it is replaced in place, never removed and re-added).
        with self._tags_lock:
            for tag, at in zip(tags, times, strict=False):
                if at is not None and not _plausible(at, now):
                    at = now  # from a store we cannot trust: invalidated now (reload, never stale)
                old = known.get(tag)
                if old is not None and old[0] is not None and (at is None or old[0] > at):
                    # Never move an invalidation time backwards, whatever a store now says (a
                    # deleted or rewritten field in Redis cannot re-validate entries).
                    at = old[0]
                known[tag] = (at, now)
                known.move_to_end(tag)  # the most recently learnt last
            while len(known) > self.tag_capacity:
                # Raise the floor before dropping the tag: a reader never sees neither.
                tag, (at, _) = next(iter(known.items()))
                if at is not None and (self._tag_floor is None or at > self._tag_floor):
                    self._tag_floor = at
                del known[tag]

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
        return self._above_tag_floor(entry)

    def invalidate_tags_locally(self, tags: Sequence[str], at: float) -> None:
        self._learn(tags, [at] * len(tags))

    # --- floors --------------------------------------------------------------------------------

    @property
    def floor_seconds(self) -> float:
        return self._floors.seconds

    @floor_seconds.setter
    def floor_seconds(self, seconds: float) -> None:
        self._floors.seconds = seconds

    def admits(self, key: str, entry: Entry) -> bool:
        """May ``entry`` be written to L1? (Caller holds the flight registry's lock.)"""
        return not self.l1_off and self._floors.admits(key, entry.version)

    def raise_floor_locked(self, key: str, version: int) -> None:
        """(Caller holds the flight registry's lock.)"""
        self._floors.raise_key(key, version)

    def cleared(self, version: int) -> None:
        """The namespace was cleared at ``version``: refuse older entries in L1 from now on, and
        mark running flights overtaken. The caller empties the tiers after this."""
        with self._flights.lock:
            self._floors.raise_all(version)
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
            self._start_pulse()

    def _start_pulse(self) -> None:
        if self.liveness is not None:
            self._pulse = Pulse(self.liveness, _weak(self, "beat"), _weak(self, "watch"), "tiercache-bus")
            self._pulse.start()
            watch_process(self)

    def after_fork(self) -> None:
        """In a forked child: a new identity (the parent's messages are not ours), fresh locks,
        our own heartbeat (the parent's threads do not exist here). The transport re-subscribes
        and calls on_reset, which clears the L1 inherited from the parent."""
        self.origin = uuid.uuid4().hex
        self._seq_lock = threading.Lock()
        self._last_seq_lock = threading.Lock()
        self._tags_lock = threading.Lock()
        self._seq = 0
        with self._last_seq_lock:
            self.origins.reset()
        self._subscribed = False
        self.deaf = self.l1_off = self._doubt = False
        if self._pulse is not None:
            self._start_pulse()

    def publish_sync(
        self, op: str, keys: Sequence[str], tags: Sequence[str], version: int, at: float
    ) -> None:
        if self.bus is None:
            return
        self.ensure_started()
        for chunk in split_keys(keys):  # receivers refuse oversized messages
            self._send(op, chunk, tags, version, at)

    def _send(self, op: str, keys: Sequence[str], tags: Sequence[str], version: int, at: float) -> None:
        assert self.bus is not None
        with self._seq_lock:  # sequence and send in one step, so receivers see them in order
            self._seq += 1
            msg = BusMessage(
                self.namespace,
                op,
                tuple(keys),
                tuple(tags),
                version,
                at,
                self.origin,
                self._seq,
                self._clock(),
            )
            try:
                self.bus.publish(self.channel, self.wire.encode(msg))
            except Exception as exc:
                failed: Exception | None = exc
            else:
                failed = None
        if failed is not None:
            self._publish_failed(msg, failed)

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
        # Receivers see a sequence gap at our next message that gets through (a beat follows
        # within liveness/5) and clear their L1. We treat it as a gap ourselves: the fault that
        # lost our message may be losing theirs too.
        now = time.monotonic()
        if now - self._publish_logged_at >= 10.0:  # one line per outage, then one per 10 s
            self._publish_logged_at = now
            logger.warning("publishing %s for namespace %s failed: %r", msg.op, msg.namespace, exc)
        if msg.op not in ("beat", "bye"):
            self._emit(EventKind.TIER_ERROR, msg.keys[0] if msg.keys else "", None, error=exc)
        if self.liveness is not None:
            self._go_deaf("a publish failed")
        else:
            self.clear_local()

    def beat(self) -> None:
        """One heartbeat (the pulse thread calls it every liveness/5 seconds)."""
        if self.bus is not None and self._subscribed:
            self._send("beat", (), (), 0, self._clock())

    def stop(self) -> None:
        """Stop the heartbeat and say goodbye, so the others do not wait for our beats."""
        pulse, self._pulse = self._pulse, None
        if pulse is not None:
            pulse.stop()
            if self._subscribed and not self.deaf:
                self._send("bye", (), (), 0, self._clock())

    # --- the bus: liveness -------------------------------------------------------------------

    def watch(self) -> None:
        """The watchdog (every liveness/20 seconds): are we deaf, has an origin gone silent?"""
        live = self.liveness
        if live is None or not self._subscribed:
            return
        now = time.monotonic()
        if not self.deaf and now - self._heard_self > 0.6 * live:
            self._go_deaf(f"our own heartbeat did not come back within {0.6 * live:.2f} s")
        with self._last_seq_lock:
            silent = self.origins.silent(now, 0.6 * live, 5 * live)
            self._doubt = self.origins.any_missing(now)
        if silent:
            logger.warning(
                "%d process(es) went silent on the bus of %s; clearing L1",
                len(silent),
                self.namespace,
            )
            self._gap()
        self.l1_off = self.deaf or self._doubt

    def _go_deaf(self, why: str) -> None:
        if not self.deaf:
            logger.warning("invalidation bus of %s looks broken (%s); L1 off", self.namespace, why)
            self.deaf = True
            self.l1_off = True
            self._emit(EventKind.BUS_GAP, "")
        self._flights.supersede_prefix(self.prefix)
        self.clear_local()

    def _heard_again(self) -> None:
        # Reads that started while deaf may carry values we were not told were replaced: refuse
        # what they bring for one liveness period, and start L1 empty.
        live = self.liveness or 1.0
        with self._flights.lock:
            self._floors.raise_all(next_version(), live)
        self._flights.supersede_prefix(self.prefix)
        self.clear_local()
        self.deaf = False
        self.l1_off = self._doubt
        self._publish_logged_at = -math.inf
        logger.warning("invalidation bus of %s works again; L1 on", self.namespace)

    def _gap(self) -> None:
        self.cleared(next_version())  # what is on its way back may predate a lost message
        self.clear_local()
        self._emit(EventKind.BUS_GAP, "")

    # --- the bus: receiving -------------------------------------------------------------------

    def on_message(self, data: bytes) -> None:
        msg = self.wire.decode(data)  # validated and, with a SignedCodec, authenticated
        if msg is None:
            return
        if msg.namespace != self.namespace:
            self.wire.reject("wrong namespace")
            return
        if msg.origin == self.origin:
            self._heard_self = time.monotonic()
            if self.deaf:
                self._heard_again()
            return
        with self._last_seq_lock:
            verdict = self.origins.observe(msg.origin, msg.seq, time.monotonic(), msg.op == "beat")
            if msg.op == "bye":
                self.origins.forget(msg.origin)
        if verdict == "gap":
            logger.info("bus gap from %s; clearing L1 of %s", msg.origin[:8], self.namespace)
            self._gap()
        if msg.op in ("beat", "bye"):
            return
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
            self.origins.reset()
        if self._resets > 1:
            logger.info("bus reconnected; clearing L1 of %s", self.namespace)
            self._emit(EventKind.BUS_GAP, "")
            # Like clear(): a read or load on its way back must not land after the L1 clear.
            self.cleared(next_version())
        self._heard_self = time.monotonic()  # our beats are due from now on
        self._subscribed = True
        self.clear_local()

    def clear_local(self) -> None:
        """Empty the in-process tiers for this namespace; cached tag times must be re-read (but
        are kept as lower bounds: see _learn)."""
        for _, tier in self._l1:
            if isinstance(tier, NamespaceClearingTier):
                tier.clear(self.prefix)
        if self.tag_store is not None:
            with self._tags_lock:
                for tag, (at, _) in list(self.tag_times.items()):
                    self.tag_times[tag] = (at, -math.inf)


def bus_channel(shared: Sequence[Any], namespace: str, bus: Bus | None) -> str:
    """``<prefix>:bus:<namespace>``: the prefix of the cache's first shared tier that has one
    (a RedisTier's key prefix), else the bus's own; two deployments that share a Redis and a
    namespace but not a prefix never hear each other."""
    prefix = next((p for p in (getattr(t, "prefix", None) for t in shared) if isinstance(p, str) and p), None)
    if prefix is None:
        own = getattr(bus, "prefix", None)
        prefix = own if isinstance(own, str) and own else "tiercache"
    return f"{prefix}:bus:{namespace}"


def _plausible(at: Any, now: float) -> bool:
    """A tag time any store may hand us: a finite, non-negative float not far in the future."""
    return type(at) is float and 0.0 <= at <= max(now, time.time()) + MAX_SKEW


def _weak(coherence: Coherence, name: str) -> Any:
    """A callable that calls ``coherence.<name>()`` without keeping the cache alive (the pulse
    threads stop once it is gone)."""
    ref = weakref.ref(coherence)

    def call() -> None:
        target = ref()
        if target is None:
            raise Gone
        getattr(target, name)()

    return call
