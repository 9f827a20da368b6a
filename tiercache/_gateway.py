"""The tier gateway: the one caller of a cache's tiers, and the place where their failures stop.

Every call into a shared tier goes through here -- the engine's commands as the drivers execute
them, Coherence's tag-store reads, the lease keeper -- so this is where tier failures stop: a failed
read is a miss, a failed write a counted skip, and ``breaker_threshold`` failures in a row open that
tier's breaker for ``breaker_cooldown`` seconds (calls skip it; the first call after the cool-down
probes). Events and counters are raised here too, and concurrent async reads are coalesced. It
makes no cache decision: those are the engine's (``_engine``). In-process tiers are also touched
directly by Coherence (dropping L1 copies on an invalidation) and by the inline hit path (an
``InlineL1`` first tier), which cannot fail the way a shared tier can.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from ._checks import closed_error
from ._coalesce import ReadCoalescer
from ._coherence import Coherence
from ._engine import NO_LEASE, AcquireLease, ReleaseLease, WaitForEntry, Write
from ._engine.fill import better_stale
from ._entry import Entry
from ._errors import SerializationError, ValueTooLargeError
from ._events import Event, EventHook, EventKind, emit_safely
from ._flight import Flight
from ._serde import Codec, Converter, convert_entry
from ._stats import CacheStats, TierStats
from ._tier import (
    CountsOwnHits,
    ExpiringTier,
    ExtendableLease,
    LeaseTier,
    NamespaceClearingTier,
    SizeLimited,
    TagStore,
    Tier,
)

__all__ = ["Breaker", "LeaseKeeper", "RedactedError", "TierGateway", "redact_error"]

logger = logging.getLogger("tiercache")


class Breaker:
    """Consecutive-failure circuit breaker for one tier (thread-safe enough: plain stores)."""

    __slots__ = ("_emit", "cooldown", "failures", "name", "open_until", "threshold")

    def __init__(self, name: str, threshold: int, cooldown: float, emit: Callable[[Event], None]) -> None:
        self.name = name
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0
        self._emit = emit

    def allows(self, now: float) -> bool:
        return now >= self.open_until

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def succeeded(self) -> None:
        if self.failures:
            was_open = self.failures >= self.threshold
            self.failures = 0
            self.open_until = 0.0
            if was_open:
                logger.info("tier %s answers again; breaker closed", self.name)
                self._emit(Event(EventKind.BREAKER_CLOSED, "", self.name))

    def failed(self, now: float, retry_after: float | None = None) -> None:
        """Count a failure. A tier that says when to come back (HTTP 429 Retry-After, a spent
        request budget) opens the breaker for exactly that long, at once."""
        self.failures += 1
        if retry_after is not None and retry_after > 0:
            self.failures = max(self.failures, self.threshold)
        if self.failures >= self.threshold:
            first = self.open_until == 0.0
            cooldown = self.cooldown if retry_after is None else max(retry_after, 0.0)
            self.open_until = max(self.open_until, now + cooldown)
            if first:
                logger.warning(
                    "tier %s failed %d times in a row; skipping it for %.1fs",
                    self.name,
                    self.failures,
                    self.cooldown,
                )
                self._emit(Event(EventKind.BREAKER_OPEN, "", self.name))


class RedactedError(Exception):
    """Stands in for an error whose message named a key, under ``redact_keys``."""


def _key_forms(key: str) -> list[str]:
    """The ways a key may appear in an error message: as is, repr'd, percent-encoded."""
    from urllib.parse import quote

    forms = {key, repr(key)[1:-1], quote(key, safe=""), quote(key)}
    return sorted((f for f in forms if f), key=len, reverse=True)


def redact_error(exc: BaseException | None, key: str) -> BaseException | None:
    """``exc``, or a RedactedError with the same text minus ``key`` if its text names the key."""
    if exc is None or not key:
        return exc
    text = f"{type(exc).__name__}: {exc}"
    digest = "key#" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    redacted = text
    for form in _key_forms(key):
        redacted = redacted.replace(form, digest)
    if redacted == text:
        return exc
    return RedactedError(redacted)


class TierGateway:
    """The tiers of one cache behind their breakers, events and coalescers (see the module)."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        clock: Callable[[], float],
        codec: Codec,
        hook: EventHook | None,
        breaker_threshold: int,
        breaker_cooldown: float,
        auto_batch: bool = True,
    ) -> None:
        self.tiers = tuple(tiers)
        self.names = tuple(t.name for t in self.tiers)
        self.clock = clock
        self.codec = codec
        self.hook: EventHook | None = None  # one hook, or a fan-out over several
        self._hooks: tuple[EventHook, ...] = ()
        if hook is not None:
            self.set_hooks((hook,))
        self.stats = CacheStats(
            [TierStats(t.name, i + 1) for i, t in enumerate(self.tiers)],
            own_hits=[t.hit_count if isinstance(t, CountsOwnHits) else None for t in self.tiers],
        )
        self._index_by_name = {t.name: i for i, t in reversed(list(enumerate(self.tiers)))}
        self.redact_keys = False  # log a digest instead of the key (keys may hold personal data)
        self.closed = False  # set by aclose()/close(): shared tiers are not reopened behind the user's back
        l1 = 0
        while l1 < len(self.tiers) and self.tiers[l1].in_process:
            l1 += 1
        self.l1 = tuple(range(l1))  # the in-process prefix, read by every caller
        self.remote = tuple(range(l1, len(self.tiers)))
        self.write_order = tuple(reversed(range(len(self.tiers))))  # shared tiers first
        # Concurrent async reads of a remote tier within one loop tick become one multi-key read.
        self.coalescers: tuple[ReadCoalescer | None, ...] = tuple(
            ReadCoalescer(t) if auto_batch and not t.in_process else None for t in self.tiers
        )
        self.breakers: tuple[Breaker | None, ...] = tuple(
            None if t.in_process else Breaker(t.name, breaker_threshold, breaker_cooldown, self._emit_event)
            for t in self.tiers
        )
        self.coherence: Coherence  # attach(): tag checks on reads, floors on L1 writes
        self._l1_lock = threading.Lock()

    def attach(self, coherence: Coherence, l1_lock: threading.Lock) -> None:
        """Give the gateway the coherence state its reads and L1 writes consult: tag validity,
        and the floors checked under ``l1_lock`` (the flight registry's) on every L1 write."""
        self.coherence = coherence
        self._l1_lock = l1_lock

    def set_hooks(self, hooks: Sequence[EventHook]) -> None:
        self._hooks = tuple(hooks)
        self.hook = None if not hooks else hooks[0] if len(hooks) == 1 else self._fan_out

    def _fan_out(self, event: Event) -> None:
        for hook in self._hooks:
            emit_safely(hook, event)

    def add_hook(self, hook: EventHook) -> Callable[[], None]:
        self.set_hooks((*self._hooks, hook))

        def remove() -> None:
            self.set_hooks(tuple(h for h in self._hooks if h is not hook))

        return remove

    # --- events ---------------------------------------------------------------------------

    def _emit_event(self, event: Event) -> None:
        """Events raised by tiers and breakers (they name their tier)."""
        index = self._index_by_name.get(event.tier) if event.tier is not None else None
        self.stats.count(event.kind, index, event.duration)
        if self.hook is not None:
            if self.redact_keys:
                event = self.redacted(event)
            emit_safely(self.hook, event)

    def emit(
        self,
        kind: str,
        key: str,
        tier: int | None = None,
        duration: float | None = None,
        error: BaseException | None = None,
        source: str | None = None,
    ) -> None:
        """Count an event and hand it to the hook; ``tier`` is the tier's index."""
        self.stats.count(kind, tier, duration)
        if self.hook is not None:
            name = None if tier is None else self.names[tier]
            event = Event(kind, key, name, duration, error, source)
            emit_safely(self.hook, self.redacted(event) if self.redact_keys else event)

    def log_key(self, key: str) -> str:
        """``key`` as it may appear in logs: itself, or a short digest with ``redact_keys``."""
        if not self.redact_keys:
            return key
        return "key#" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]

    def redacted(self, event: Event) -> Event:
        """``event`` as a hook may see it with ``redact_keys``: the key's digest, and an error
        whose text named the key replaced by a RedactedError with the digest instead."""
        if not event.key:  # cache-wide events (a breaker opening) name no key
            return event
        return event._replace(key=self.log_key(event.key), error=redact_error(event.error, event.key))

    def log_error(self, exc: BaseException | None, key: str) -> str:
        """``repr(exc)`` for a log line, with the key (and its encoded forms) redacted if asked."""
        if self.redact_keys:
            exc = redact_error(exc, key)
        return repr(exc)

    def tier_failed(self, index: int, key: str, exc: BaseException, what: str) -> None:
        name = self.names[index]
        logger.debug(
            "%s of %s on tier %s failed: %s",
            what,
            self.log_key(key),
            name,
            self.log_error(exc, key),
        )
        breaker = self.breakers[index]
        if breaker is not None:
            retry_after = getattr(exc, "retry_after", None)
            breaker.failed(self.clock(), retry_after if isinstance(retry_after, (int, float)) else None)
        self.emit(EventKind.TIER_ERROR, key, index, error=exc)

    def _tier_ok(self, index: int) -> None:
        breaker = self.breakers[index]
        if breaker is not None and breaker.failures:
            breaker.succeeded()

    def tier_usable(self, index: int, key: str) -> bool:
        if self.closed:
            raise closed_error()
        breaker = self.breakers[index]
        if breaker is None or not breaker.open_until or breaker.allows(self.clock()):
            return True
        self.emit(EventKind.TIER_SKIPPED, key, index)
        return False

    # --- reads ---

    def l1_walk(
        self, key: str, now: float, tags_valid: Callable[[Entry], bool | None]
    ) -> tuple[Entry | None, int, Entry | None, Entry | None]:
        """Walk the in-process tiers: ``(fresh entry, its index, best stale entry, entry whose tag
        state is unknown)``. A fresh hit found below the first tier is back-filled upward. When
        ``tags_valid`` cannot decide (None), the walk stops and hands the entry back, so an async
        caller can fetch the tag times and walk again."""
        stale: Entry | None = None
        for i in self.l1:
            tier = self.tiers[i]
            counters = self.stats.tiers[i]
            entry = tier.get(key)
            if entry is None:
                counters.misses += 1
                continue
            if entry.tags:
                valid = tags_valid(entry)
                if valid is None:
                    return None, -1, stale, entry
                if not valid:
                    tier.delete(key, entry.version)  # invalidated by a tag: gone, not even stale
                    counters.misses += 1
                    counters.tag_invalid += 1
                    continue
            if now < entry.fresh_until:
                counters.hits += 1  # (ignored for tiers that count their own hits)
                if i:
                    self.write_sync(Write(range(i), key, entry, backfill=True))
                return entry, i, stale, None
            counters.stale_hits += 1
            if now < entry.stale_until and better_stale(entry, stale):
                stale = entry
        return None, -1, stale, None

    def typed(
        self, index: int, key: str, entry: Entry | None, conv: Converter | None, count_miss: bool = True
    ) -> Entry | None:
        """Check a tier's answer: alive, really this key, converted to the caller's type."""
        if entry is None:
            if count_miss:
                self.emit(EventKind.MISS, key, index)
            return None
        now = self.clock()
        if entry.key != key or not entry.stale_until > now:
            if entry.key != key:
                self.emit(EventKind.CORRUPT, key, index)
            return None
        if not entry.typed:
            try:
                entry = convert_entry(entry, conv)
            except SerializationError as exc:
                self.emit(EventKind.CORRUPT, key, index, error=exc)
                return None
        fresh = now < entry.fresh_until
        self.emit(EventKind.HIT if fresh else EventKind.STALE_HIT, key, index)
        return entry

    # --- cache.check(): ask each tier whether it answers now ---------------------------------
    #
    # A tier's own ``check``/``acheck`` (a PING on Redis) returns None when it answers, else the
    # reason; a tier without one answers if a read of ``probe_key`` does not fail. The answer is
    # (reason, breaker_open); it neither counts against nor resets the tier's breaker.

    def _breaker_open(self, index: int) -> bool:
        breaker = self.breakers[index]
        return bool(breaker is not None and breaker.open_until and not breaker.allows(self.clock()))

    def check_sync(self, index: int, probe_key: str) -> tuple[str | None, bool]:
        tier = self.tiers[index]
        probe = getattr(tier, "check", None)
        reason: str | None = None
        try:
            if probe is not None:
                reason = probe()
            else:
                tier.get(probe_key)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        return reason, self._breaker_open(index)

    async def check_async(self, index: int, probe_key: str) -> tuple[str | None, bool]:
        tier = self.tiers[index]
        probe = getattr(tier, "acheck", None)
        reason: str | None = None
        try:
            if probe is not None:
                reason = await probe()
            else:
                await tier.aget(probe_key)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        return reason, self._breaker_open(index)

    def read_sync(
        self, index: int, key: str, conv: Converter | None, count_miss: bool = True
    ) -> Entry | None:
        if not self.tier_usable(index, key):
            return None
        try:
            entry = self.tiers[index].get(key)
        except SerializationError as exc:  # the tier answered, with bytes that are not an entry
            self.emit(EventKind.CORRUPT, key, index, error=exc)
            return None
        except Exception as exc:
            self.tier_failed(index, key, exc, "get")
            return None
        self._tier_ok(index)
        typed = self.typed(index, key, entry, conv, count_miss)
        if typed is not None and typed.tags and not self.coherence.tags_valid_sync(typed):
            return None
        return typed

    async def read_async(
        self, index: int, key: str, conv: Converter | None, count_miss: bool = True
    ) -> Entry | None:
        if not self.tier_usable(index, key):
            return None
        coalescer = self.coalescers[index]
        try:
            if coalescer is not None:
                entry = await coalescer.get(key)
            else:
                entry = await self.tiers[index].aget(key)
        except SerializationError as exc:
            self.emit(EventKind.CORRUPT, key, index, error=exc)
            return None
        except Exception as exc:
            self.tier_failed(index, key, exc, "get")
            return None
        self._tier_ok(index)
        typed = self.typed(index, key, entry, conv, count_miss)
        if typed is not None and typed.tags and not await self.coherence.tags_valid_async(typed):
            return None
        return typed

    def _typed_many(
        self, index: int, keys: Sequence[str], entries: Sequence[Entry | None], conv: Converter | None
    ) -> list[Entry | None]:
        return [self.typed(index, key, entry, conv) for key, entry in zip(keys, entries, strict=True)]

    def read_many_sync(self, index: int, keys: Sequence[str], conv: Converter | None) -> list[Entry | None]:
        if self.tiers[index].in_process:
            return [self.read_sync(index, k, conv) for k in keys]
        if not self.tier_usable(index, keys[0]):
            return [None] * len(keys)
        try:
            raw = self.tiers[index].get_many(keys)
        except Exception as exc:
            self.tier_failed(index, keys[0], exc, "get_many")
            return [None] * len(keys)
        self._tier_ok(index)
        out = self._typed_many(index, keys, raw, conv)
        return [e if e is None or not e.tags or self.coherence.tags_valid_sync(e) else None for e in out]

    async def read_many_async(
        self, index: int, keys: Sequence[str], conv: Converter | None
    ) -> list[Entry | None]:
        if self.tiers[index].in_process:
            return [self.read_sync(index, k, conv) for k in keys]
        if not self.tier_usable(index, keys[0]):
            return [None] * len(keys)
        try:
            raw = await self.tiers[index].aget_many(keys)
        except Exception as exc:
            self.tier_failed(index, keys[0], exc, "get_many")
            return [None] * len(keys)
        self._tier_ok(index)
        out = self._typed_many(index, keys, raw, conv)
        return [
            e if e is None or not e.tags or await self.coherence.tags_valid_async(e) else None for e in out
        ]

    def _many_items(
        self, index: int, items: Sequence[tuple[str, Entry]], fences: dict[str, Any] | None, backfill: bool
    ) -> list[tuple[str, Entry]]:
        """The items tier ``index`` should take: not superseded, not too large, encodable."""
        keep: list[tuple[str, Entry]] = []
        remote = not self.tiers[index].in_process
        for key, entry in items:
            fence = fences.get(key) if fences else None
            if fence is not None and fence.superseded:
                continue
            if not remote and not self.coherence.admits(key, entry):
                continue
            if remote:
                try:
                    self.prepare(entry, (index,))
                except SerializationError:
                    if backfill:
                        continue
                    raise
                if not self.fits(index, entry):
                    self._too_large(index, key, entry)
                    continue
            keep.append((key, entry))
        return keep

    def _write_l1_many(
        self, index: int, items: Sequence[tuple[str, Entry]], fences: dict[str, Any] | None, backfill: bool
    ) -> None:
        """The in-process part of write_many_*: never awaits, so both drivers share it."""
        with self._l1_lock:  # atomic with delete()'s supersede marks
            for key, entry in self._many_items(index, items, fences, backfill):
                self._set_sync(index, key, entry, backfill)

    def write_many_sync(
        self,
        indices: Sequence[int],
        items: Sequence[tuple[str, Entry]],
        fences: dict[str, Any] | None,
        backfill: bool,
    ) -> None:
        for i in indices:
            tier = self.tiers[i]
            if tier.in_process:
                self._write_l1_many(i, items, fences, backfill)
                continue
            keep = self._many_items(i, items, fences, backfill)
            if not keep or not self.tier_usable(i, keep[0][0]):
                continue
            try:
                tier.set_many(keep)
            except Exception as exc:
                self.tier_failed(i, keep[0][0], exc, "set_many")
            else:
                self._tier_ok(i)

    async def write_many_async(
        self,
        indices: Sequence[int],
        items: Sequence[tuple[str, Entry]],
        fences: dict[str, Any] | None,
        backfill: bool,
    ) -> None:
        for i in indices:
            tier = self.tiers[i]
            if tier.in_process:
                self._write_l1_many(i, items, fences, backfill)
                continue
            keep = self._many_items(i, items, fences, backfill)
            if not keep or not self.tier_usable(i, keep[0][0]):
                continue
            try:
                await tier.aset_many(keep)
            except Exception as exc:
                self.tier_failed(i, keep[0][0], exc, "set_many")
            else:
                self._tier_ok(i)

    # --- writes ---------------------------------------------------------------------------

    def prepare(self, entry: Entry, indices: Sequence[int]) -> None:
        """Encode once for the remote tiers among ``indices`` (SerializationError if impossible)."""
        if entry.payload is None and any(not self.tiers[i].in_process for i in indices):
            entry.payload = self.codec.dumps(entry)

    def fits(self, index: int, entry: Entry) -> bool:
        tier = self.tiers[index]
        limit = tier.max_value_bytes if isinstance(tier, SizeLimited) else None
        return limit is None or entry.payload is None or len(entry.payload) <= limit

    def _too_large(self, index: int, key: str, entry: Entry) -> None:
        size = len(entry.payload or b"")
        self.emit(
            EventKind.TIER_ERROR,
            key,
            index,
            error=ValueTooLargeError(f"{self.names[index]}: {size} bytes is over this tier's limit"),
        )

    def write_sync(self, op: Write) -> int:
        """Perform a Write; returns how many tiers took the entry (-1: every tier refused it as
        too large).

        Tiers are written in ``op.indices`` order (shared tiers first for new values). When a
        shared tier refuses the entry because it holds a newer version (its set-if-newer said
        no), the in-process tiers are not written: L1 must never keep a copy its shared tier
        refused (invariant 4 of ``_engine``), with or without a bus to correct it later."""
        if not self._encoded(op):
            return 0
        results: list[int] = []
        for i in op.indices:
            if _REFUSED in results and self.tiers[i].in_process:
                continue
            results.append(self._write_one_sync(i, op))
        return _tally(results)

    async def write_async(self, op: Write) -> int:
        if not self._encoded(op):
            return 0
        results: list[int] = []
        for i in op.indices:
            if _REFUSED in results and self.tiers[i].in_process:
                continue
            results.append(await self._write_one_async(i, op))
        return _tally(results)

    def _encoded(self, op: Write) -> bool:
        """Encode for the remote tiers once; False if a back-fill cannot be (it is then skipped;
        a new value's SerializationError propagates)."""
        try:
            self.prepare(op.entry, op.indices)
        except SerializationError:
            if op.backfill:
                return False
            raise
        return True

    def _write_one_sync(self, i: int, op: Write) -> int:
        if self.tiers[i].in_process:
            return self.set_in_process(i, op.key, op.entry, op.backfill, op.fence)
        if op.fence is not None and op.fence.superseded:
            return 0  # overtaken by a delete: best effort for tiers without tombstones
        return self._set_sync(i, op.key, op.entry, op.backfill)

    async def _write_one_async(self, i: int, op: Write) -> int:
        if self.tiers[i].in_process:
            return self.set_in_process(i, op.key, op.entry, op.backfill, op.fence)
        if op.fence is not None and op.fence.superseded:
            return 0
        return await self._set_async(i, op.key, op.entry, op.backfill)

    def set_in_process(self, i: int, key: str, entry: Entry, backfill: bool, fence: Flight | None) -> int:
        """Write an in-process tier, unless a delete overtook the load (``fence``) or a newer
        write or delete was announced for the key (the coherence floor). Atomic with both marks:
        they are set under the same lock, so an old copy read from a shared tier just before an
        invalidation can never land in L1 just after it."""
        with self._l1_lock:
            if fence is not None and fence.superseded:
                return 0
            if not self.coherence.admits(key, entry):
                return 0
            return self._set_sync(i, key, entry, backfill)

    # One tier's set: 1 written, 0 skipped (breaker open, tier error), -1 refused as too large,
    # _REFUSED (-2) refused because the tier holds a newer version.

    def _set_refused(self, i: int, key: str, entry: Entry) -> int | None:
        if not self.fits(i, entry):
            self._too_large(i, key, entry)
            return -1
        return None if self.tier_usable(i, key) else 0

    def _set_failed(self, i: int, key: str, exc: Exception) -> int:
        if isinstance(exc, ValueTooLargeError):
            self.emit(EventKind.TIER_ERROR, key, i, error=exc)
            return -1
        self.tier_failed(i, key, exc, "set")
        return 0

    def _set_done(self, i: int, key: str, backfill: bool, taken: bool | None) -> int:
        self._tier_ok(i)
        if taken is False:  # the tier holds a newer version (see Tier.set)
            return _REFUSED
        if backfill:
            self.emit(EventKind.BACKFILL, key, i)
        return 1

    def _set_sync(self, i: int, key: str, entry: Entry, backfill: bool) -> int:
        refused = self._set_refused(i, key, entry)
        if refused is not None:
            return refused
        try:
            taken = self.tiers[i].set(key, entry)
        except Exception as exc:
            return self._set_failed(i, key, exc)
        return self._set_done(i, key, backfill, taken)

    async def _set_async(self, i: int, key: str, entry: Entry, backfill: bool) -> int:
        refused = self._set_refused(i, key, entry)
        if refused is not None:
            return refused
        try:
            taken = await self.tiers[i].aset(key, entry)
        except Exception as exc:
            return self._set_failed(i, key, exc)
        return self._set_done(i, key, backfill, taken)

    def delete_sync(self, key: str, version: int) -> None:
        for i in self.write_order:  # shared tiers first, so L1 cannot be re-filled from them
            if self.tiers[i].in_process or self.tier_usable(i, key):
                try:
                    self.tiers[i].delete(key, version)
                except Exception as exc:
                    self.tier_failed(i, key, exc, "delete")
                else:
                    self._tier_ok(i)

    async def delete_async(self, key: str, version: int) -> None:
        for i in self.write_order:
            tier = self.tiers[i]
            if tier.in_process:
                tier.delete(key, version)
                continue
            if self.tier_usable(i, key):
                try:
                    await tier.adelete(key, version)
                except Exception as exc:
                    self.tier_failed(i, key, exc, "delete")
                else:
                    self._tier_ok(i)

    def _expired_copy(self, index: int, key: str, at: float, version: int) -> Entry | None:
        entry = self.tiers[index].get(key)
        if entry is None or entry.version > version:
            return None
        copy = entry.replace(fresh_until=min(entry.fresh_until, at), version=version)
        self.prepare(copy, (index,))
        return copy

    def expire_sync(self, key: str, at: float, version: int) -> None:
        """Mark ``key`` stale in every tier (shared tiers first); the value stays for fail-safe."""
        for i in self.write_order:
            tier: Any = self.tiers[i]
            if not (tier.in_process or self.tier_usable(i, key)):
                continue
            try:
                if isinstance(tier, ExpiringTier):
                    tier.expire(key, at, version)
                else:  # no atomic expire: read, lower fresh_until, write back under the new version
                    copy = self._expired_copy(i, key, at, version)
                    if copy is not None:
                        tier.set(key, copy)
            except Exception as exc:
                self.tier_failed(i, key, exc, "expire")
            else:
                self._tier_ok(i)

    async def expire_async(self, key: str, at: float, version: int) -> None:
        for i in self.write_order:
            tier: Any = self.tiers[i]
            if tier.in_process:
                self.expire_in_process(i, key, at, version)
                continue
            if not self.tier_usable(i, key):
                continue
            try:
                if isinstance(tier, ExpiringTier):
                    await tier.aexpire(key, at, version)
                else:
                    entry = await tier.aget(key)
                    if entry is not None and entry.version <= version:
                        copy = entry.replace(fresh_until=min(entry.fresh_until, at), version=version)
                        self.prepare(copy, (i,))
                        await tier.aset(key, copy)
            except Exception as exc:
                self.tier_failed(i, key, exc, "expire")
            else:
                self._tier_ok(i)

    def expire_in_process(self, index: int, key: str, at: float, version: int) -> None:
        tier: Any = self.tiers[index]
        if isinstance(tier, ExpiringTier):
            tier.expire(key, at, version)
        else:
            copy = self._expired_copy(index, key, at, version)
            if copy is not None:
                tier.set(key, copy)

    def clear_sync(self, prefix: str) -> None:
        for i in self.write_order:
            tier: Any = self.tiers[i]
            if not isinstance(tier, NamespaceClearingTier):
                logger.warning("tier %s cannot clear a namespace; skipped", self.names[i])
                continue
            if self.tiers[i].in_process or self.tier_usable(i, prefix):
                try:
                    tier.clear(prefix)
                except Exception as exc:
                    self.tier_failed(i, prefix, exc, "clear")

    async def clear_async(self, prefix: str) -> None:
        for i in self.write_order:
            tier: Any = self.tiers[i]
            if not isinstance(tier, NamespaceClearingTier):
                logger.warning("tier %s cannot clear a namespace; skipped", self.names[i])
                continue
            if self.tiers[i].in_process:
                tier.clear(prefix)
            elif self.tier_usable(i, prefix):
                try:
                    await tier.aclear(prefix)
                except Exception as exc:
                    self.tier_failed(i, prefix, exc, "clear")

    def tag_times_sync(self, key: str, tags: Sequence[str]) -> list[float | None] | None:
        """The shared tag store's times for ``tags`` (for ``key``'s entry); None when it cannot
        be asked (breaker open, or it failed: counted like any tier failure)."""
        index = self.coherence.tag_store
        if index is None or not self.tier_usable(index, key):
            return None
        store = cast(TagStore, self.tiers[index])
        try:
            times = store.get_tag_times(list(tags))
        except Exception as exc:
            self.tier_failed(index, key, exc, "get_tag_times")
            return None
        self._tier_ok(index)
        return times

    async def tag_times_async(self, key: str, tags: Sequence[str]) -> list[float | None] | None:
        index = self.coherence.tag_store
        if index is None or not self.tier_usable(index, key):
            return None
        store = cast(TagStore, self.tiers[index])
        try:
            times = await store.aget_tag_times(list(tags))
        except Exception as exc:
            self.tier_failed(index, key, exc, "get_tag_times")
            return None
        self._tier_ok(index)
        return times

    def store_tag_times_sync(self, tags: Sequence[str], at: float) -> None:
        index = self.coherence.tag_store
        if index is not None and self.tier_usable(index, ""):
            store: Any = self.tiers[index]
            try:
                store.set_tag_times(list(tags), at)
            except Exception as exc:
                self.tier_failed(index, "", exc, "set_tag_times")

    async def store_tag_times_async(self, tags: Sequence[str], at: float) -> None:
        index = self.coherence.tag_store
        if index is not None and self.tier_usable(index, ""):
            store: Any = self.tiers[index]
            try:
                await store.aset_tag_times(list(tags), at)
            except Exception as exc:
                self.tier_failed(index, "", exc, "set_tag_times")

    # --- leases ---

    def lease_keeper(self, key: str, lease: tuple[int, str] | None, ttl: float) -> LeaseKeeper | None:
        """A keeper that extends a held lease while a load runs (None: nothing to keep)."""
        if lease is None or not isinstance(self.tiers[lease[0]], ExtendableLease):
            return None
        return LeaseKeeper(self, lease[0], key, lease[1], ttl)

    def acquire_lease_sync(self, op: AcquireLease) -> str | None:
        """The lease's token, None (another process holds it) or NO_LEASE (the tier failed)."""
        if not self.tier_usable(op.index, op.key):
            return NO_LEASE
        try:
            return self.lease_tier(op.index).acquire_lease(op.key, op.ttl)
        except Exception as exc:
            self.tier_failed(op.index, op.key, exc, "acquire_lease")
            return NO_LEASE

    async def acquire_lease_async(self, op: AcquireLease) -> str | None:
        if not self.tier_usable(op.index, op.key):
            return NO_LEASE
        try:
            return await self.lease_tier(op.index).aacquire_lease(op.key, op.ttl)
        except Exception as exc:
            self.tier_failed(op.index, op.key, exc, "acquire_lease")
            return NO_LEASE

    def release_lease_sync(self, op: ReleaseLease) -> None:
        try:
            self.lease_tier(op.index).release_lease(op.key, op.token)
        except Exception as exc:
            self.tier_failed(op.index, op.key, exc, "release_lease")

    async def release_lease_async(self, op: ReleaseLease) -> None:
        try:
            await self.lease_tier(op.index).arelease_lease(op.key, op.token)
        except Exception as exc:
            self.tier_failed(op.index, op.key, exc, "release_lease")

    def wait_for_entry_sync(self, op: WaitForEntry) -> Entry | None:
        started = time.perf_counter()
        try:
            raw = self.lease_tier(op.index).wait_for_entry(op.key, op.timeout)
        except Exception as exc:
            self.tier_failed(op.index, op.key, exc, "wait_for_entry")
            return None
        entry = self._waited(op, raw, started)
        if entry is not None and entry.tags and not self.coherence.tags_valid_sync(entry):
            return None
        return entry

    async def wait_for_entry_async(self, op: WaitForEntry) -> Entry | None:
        started = time.perf_counter()
        try:
            raw = await self.lease_tier(op.index).await_for_entry(op.key, op.timeout)
        except Exception as exc:
            self.tier_failed(op.index, op.key, exc, "wait_for_entry")
            return None
        entry = self._waited(op, raw, started)
        if entry is not None and entry.tags and not await self.coherence.tags_valid_async(entry):
            return None
        return entry

    def _waited(self, op: WaitForEntry, raw: Entry | None, started: float) -> Entry | None:
        self.emit(EventKind.LEASE_WAIT, op.key, op.index, time.perf_counter() - started)
        return self.typed(op.index, op.key, raw, op.converter)

    def lease_tier(self, index: int) -> LeaseTier:
        tier: Any = self.tiers[index]
        return tier  # type: ignore[no-any-return]


_REFUSED = -2  # a tier's set-if-newer kept the newer version it holds


def _tally(results: list[int]) -> int:
    """Tiers written, or -1 when every tier refused the entry as too large."""
    too_large = results.count(-1)
    return -1 if too_large and too_large == len(results) else sum(r for r in results if r > 0)


class LeaseKeeper:
    """Extends a held lease every third of its TTL while a load runs: from a thread for sync
    loads (``start``/``stop``), from the awaiting coroutine for async ones (``aextend``)."""

    def __init__(self, gw: TierGateway, index: int, key: str, token: str, ttl: float) -> None:
        self.gw = gw
        self.index = index
        self.key = key
        self.token = token
        self.ttl = ttl
        self.every = max(ttl / 3, 0.01)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _failed(self, exc: Exception) -> None:
        self.gw.tier_failed(self.index, self.key, exc, "extend_lease")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tiercache-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tier = self.gw.tiers[self.index]
        assert isinstance(tier, ExtendableLease)  # lease_keeper() checked
        while not self._stop.wait(self.every):
            try:
                if not tier.extend_lease(self.key, self.token, self.ttl):
                    return  # lost it (expired, or deleted): nothing left to keep
            except Exception as exc:
                self._failed(exc)

    def stop(self) -> None:
        self._stop.set()

    async def aextend(self) -> bool:
        tier = self.gw.tiers[self.index]
        assert isinstance(tier, ExtendableLease)
        try:
            return bool(await tier.aextend_lease(self.key, self.token, self.ttl))
        except Exception as exc:
            self._failed(exc)
            return True
