"""``get_cached`` after the L1 walk: SWR and early refresh, join-or-lead, and the leader's flow.

``cached_flow`` is what both drivers run for a ``get_cached`` call once the in-process tiers have
been walked (the walk itself, which may fetch tag times, is the drivers' I/O). ``lead_flow`` is
what a flight's leader runs -- also a background refresh -- and ends by resolving the flight.
The drivers answer :class:`Join` and :class:`Refresh` with what they own: the waiting (threads
block, tasks await, both watch for a dead leader) and the background thread or task; the flight a
flow leads is put in the driver's ``FenceSlot`` (its loads' fence, and what a cancelled async
leader hands to a take-over). See the package essay for the algorithm.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any, Protocol

from .._coherence import Coherence
from .._entry import Entry, next_version
from .._events import EventKind
from .._flight import Flight, FlightAborted, FlightRegistry
from .._policy import Policy
from .commands import FillPlan, Join, LoadOutcome, Outcome, Read, Refresh, Source, Write
from .fill import NOT_READ, fill_flow, join_limit, tier_hit
from .many import many_flow

__all__ = [
    "CachedHost",
    "FenceSlot",
    "cached_flow",
    "lead_flow",
    "many_cached_flow",
    "refresh_flight",
    "take_l1",
]


class FenceSlot(Protocol):
    """Where a driver's run of a flow learns the flight it leads (set once the flow leads)."""

    fence: Flight | None


class CachedHost(Protocol):
    """What these flows need from the cache's runtime (in-process state only, no I/O)."""

    plan: FillPlan
    flights: FlightRegistry
    coherence: Coherence
    names: tuple[str, ...]

    def emit(
        self,
        kind: str,
        key: str,
        tier: int | None = None,
        duration: float | None = None,
        error: BaseException | None = None,
        source: str | None = None,
    ) -> None: ...

    def build_entry(
        self, key: str, value: Any, policy: Policy, loaded: LoadOutcome, version: int
    ) -> Entry | None: ...


Walked = tuple[Entry | None, int, Entry | None]  # (fresh entry, its index, best stale) from L1


def cached_flow(
    host: CachedHost,
    key: str,
    policy: Policy,
    walked: Walked,
    now: float,
    *,
    loop: asyncio.AbstractEventLoop | None,
    blocking_loop: asyncio.AbstractEventLoop | None = None,
    slot: FenceSlot | None = None,
) -> Generator[Any, Any, Outcome]:
    """The answer to ``get_cached`` given what L1 held. ``loop`` is the caller's event loop when
    it awaits (its flights belong to that loop), None for a blocking caller; ``blocking_loop`` is
    the loop running in a blocking caller's thread, if any: joining a flight of that loop would
    block the loop its leader needs, so such a caller fills on its own instead."""
    entry, index, stale = walked
    if entry is not None:
        if policy.early_refresh and policy.wants_early_refresh(entry, now):
            yield Refresh(key, entry)
        return Outcome(entry.value, entry, f"L{index + 1}", host.names[index])
    if stale is not None and policy.swr:
        host.emit(EventKind.STALE_SERVED, key, source=Source.STALE_SWR)
        yield Refresh(key, stale)
        return Outcome(stale.value, stale, Source.STALE_SWR)
    host.coherence.ensure_started()
    while True:
        flight, leader = host.flights.join_or_lead(key, loop)
        if leader:
            return (yield from lead_flow(host, flight, key, policy, stale, slot=slot))
        if blocking_loop is not None and flight.loop is blocking_loop:
            solo = Flight(key, next_version(), None)  # never registered: nobody joins it
            return (yield from lead_flow(host, solo, key, policy, stale, slot=slot))
        host.emit(EventKind.JOIN, key)
        limit, serve_stale = join_limit(policy, stale, now)
        if serve_stale and flight.late and stale is not None:
            # The load already passed a soft timeout and goes on: no point waiting for it again.
            host.emit(EventKind.STALE_SERVED, key, source=Source.STALE_FAILSAFE)
            return Outcome(stale.value, stale, Source.STALE_FAILSAFE)
        resolved: bool = yield Join(flight, limit)
        if not resolved:
            if serve_stale and stale is not None:
                host.emit(EventKind.STALE_SERVED, key, source=Source.STALE_FAILSAFE)
                return Outcome(stale.value, stale, Source.STALE_FAILSAFE)
            host.flights.detach(flight)  # hung past our own hard_timeout: lead a new flight
            continue
        if isinstance(flight.error, FlightAborted):
            continue  # its leader went away without an outcome: start anew
        shared: Outcome = flight.result()
        return Outcome(shared.value, shared.entry, Source.JOINED, shared.tier)


def lead_flow(
    host: CachedHost,
    flight: Flight,
    key: str,
    policy: Policy,
    stale: Entry | None,
    refresh: bool = False,
    slot: FenceSlot | None = None,
) -> Generator[Any, Any, Outcome]:
    """Lead ``flight``: run ``fill_flow``, resolve the flight for its joiners (unless a late load
    now owns it), and ask for a background refresh when the answer wants one. An error thrown in
    by the driver ends the flight with it (a non-Exception one as FlightAborted: joiners retry)."""
    if slot is not None:
        slot.fence = flight
    plan = host.plan
    try:
        # Most flights end on a fresh entry in the first shared tier: read it here and answer
        # without building fill_flow (whose walk would read it first too); else hand it over.
        first_read: Any = NOT_READ
        outcome: Outcome | None = None
        if plan.remote and not refresh:
            first = plan.remote[0]
            first_read = yield Read(first, key, policy.converter)
            now = plan.clock()
            if first_read is not None and now < first_read.fresh_until:
                if first > 0:
                    yield Write(range(first), key, first_read, backfill=True)
                outcome = tier_hit(plan, policy, first, first_read, now)
        if outcome is None:
            outcome = yield from fill_flow(
                plan,
                key,
                policy,
                stale=stale,
                version=flight.version,
                fence=flight,
                refresh=refresh,
                build=host.build_entry,
                first_read=first_read,
            )
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit):
            error = exc if isinstance(exc, Exception) else FlightAborted(repr(exc))
            host.flights.finish(flight, error=error)
        raise
    if outcome.late:  # the driver's late finisher resolves the flight
        flight.late = True
    else:
        host.flights.finish(flight, outcome)
    if outcome.source in (Source.STALE_SWR, Source.STALE_FAILSAFE):
        host.emit(EventKind.STALE_SERVED, key, source=outcome.source)
    if outcome.refresh:
        yield Refresh(key, outcome.entry)
    return outcome


def refresh_flight(host: CachedHost, key: str, loop: asyncio.AbstractEventLoop | None) -> Flight | None:
    """The flight a background refresh of ``key`` leads, or None if one is running already."""
    flight, leader = host.flights.join_or_lead(key, loop)
    return flight if leader else None


def take_l1(
    host: CachedHost, key: str, walked: Walked, results: dict[str, Outcome], stale: dict[str, Entry]
) -> None:
    """Record one key's L1 walk for ``get_many_cached``: a fresh hit answers it, a stale copy is
    remembered as its fail-safe candidate."""
    entry, index, best_stale = walked
    if best_stale is not None:
        stale[key] = best_stale
    if entry is not None:
        results[key] = Outcome(entry.value, entry, f"L{index + 1}", host.names[index])


def many_cached_flow(
    host: CachedHost,
    keys: list[str],
    policy: Policy,
    results: dict[str, Outcome],
    stale: dict[str, Entry],
    *,
    loop: asyncio.AbstractEventLoop | None,
) -> Generator[Any, Any, dict[str, Outcome]]:
    """``get_many_cached`` after the L1 pass (``results`` holds its hits): lead the keys nobody is
    loading (one ``many_flow``), join the others, and resolve every flight led, one outcome per
    key. A key the batch loader did not return ends its flight with FlightAborted (its joiners
    load it alone); the loader's error is raised when some led key got neither value nor stale."""
    host.coherence.ensure_started()
    led: dict[str, Flight] = {}
    joined: dict[str, Flight] = {}
    for key in keys:
        if key not in results:
            flight, leader = host.flights.join_or_lead(key, loop)
            (led if leader else joined)[key] = flight
    if led:
        try:
            result = yield from many_flow(
                host.plan,
                list(led),
                policy,
                stale=stale,
                versions={k: f.version for k, f in led.items()},
                fences=dict(led),
                build=host.build_entry,
            )
        except BaseException as exc:  # GeneratorExit too: a driver that gave up closes the flow
            error = exc if isinstance(exc, Exception) else FlightAborted(repr(exc))
            for flight in led.values():
                host.flights.finish(flight, error=error)
            raise
        for key, flight in led.items():
            outcome = result.outcomes.get(key)
            if outcome is not None:
                host.flights.finish(flight, outcome)
            else:
                host.flights.finish(flight, error=FlightAborted("not returned by the batch loader"))
        if result.error is not None and any(k not in result.outcomes for k in led):
            raise result.error
        results.update(result.outcomes)
    for key, flight in joined.items():
        yield Join(flight, None)
        if flight.error is None:
            shared: Outcome = flight.outcome
            results[key] = Outcome(shared.value, shared.entry, Source.JOINED, shared.tier)
    return results
