"""The get_cached algorithm, once, as a sans-I/O generator that the sync and async drivers run.

Theory of operation
-------------------
A cache is a chain of tiers, fastest first. The leading *in-process* tiers (L1) are read by every
caller, inline, by the drivers (and by the decorator's fast path); nothing here runs on an L1 hit.
When L1 has no fresh entry, exactly one caller per key per process -- the *flight leader* -- runs
:func:`fill_flow`; every other caller (asyncio task or thread) joins its flight and shares its
outcome (see ``_flight``). So 100 callers of a cold key cost one lease and one load.

One shortcut, because most flights end on a hit in the first shared tier: when that tier is also
the lease tier (memory -> Redis), the drivers' leader reads it before building the flow, and a
fresh answer is back-filled and returned through :func:`tier_hit`, the function the flow uses for
the same case. Anything else is handed to ``fill_flow`` as ``first_read``, and the walk starts
below it, so no tier is read twice. Joiners are unaffected: they still wait on the flight.

``fill_flow`` never touches I/O. It yields *operations* (:class:`Read`, :class:`Write`,
:class:`Load`, lease operations) and is sent their results; the driver does the I/O, the timing,
the error handling and the circuit breaking. A tier error therefore arrives here as a plain miss,
and a write that fails is a skip the driver has already counted.

Invariants this module keeps (tests/property checks them):

1. Nothing past ``stale_until`` is ever returned: every candidate is checked against the clock.
2. A stale entry is returned only when the policy asks for it (SWR, or fail-safe after a failed or
   too-slow load); otherwise it is only remembered as a fail-safe candidate.
3. Back-fill copies the entry *unchanged* into the tiers above the one it was found in, so its
   absolute times come along and its life is never extended (tiers clamp, never extend).
4. New entries are written bottom-up (shared tiers first, L1 last), so an L1 copy never exists
   without the shared copy it came from, and readers in other processes never see L1-only data.
5. A loaded entry carries the version taken when its flight *started*; a ``set`` or ``delete`` that
   lands during the load has a larger version, and tiers refuse to let the older one overwrite it.
6. A lease taken is released on every path out (value written, loader failed, driver error).
7. A fail-safe answer throttles the loader by writing the stale entry back *unchanged but for
   fresh_until* (same version, same stale_until): every process then serves it for the throttle
   window, and any real write or delete, having a larger version, still wins.

``many_flow`` in ``_batch`` is the same algorithm for many keys at once (get_many_cached).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from ._entry import Entry
from ._policy import Policy
from ._serde import Converter

__all__ = [
    "AcquireLease",
    "FillPlan",
    "Load",
    "LoadOutcome",
    "NO_LEASE",
    "Outcome",
    "Read",
    "ReleaseLease",
    "Source",
    "WaitForEntry",
    "Write",
    "better_stale",
    "fill_flow",
    "tier_hit",
]


class Source:
    """Where a returned value came from (``Lookup.source``). Tier hits are "L1", "L2"... by
    position in the chain (``Lookup.tier`` names the tier)."""

    LOADED = "LOADED"
    JOINED = "JOINED"
    STALE_SWR = "STALE_SWR"
    STALE_FAILSAFE = "STALE_FAILSAFE"


NO_LEASE = "<no lease>"  # AcquireLease's answer when the lease tier failed: load without one
NOT_READ: Any = object()  # ``fill_flow(first_read=...)``: the caller did not read the first tier

# --- operations the flow yields -----------------------------------------------------------------


@dataclass(slots=True)
class Read:
    """Read tier ``index``; the driver sends back a typed Entry or None (miss, error, corrupt).

    ``count_miss=False`` for a re-read of a tier this flight already counted a miss on (under the
    lease): one cold load is one miss per tier, as hit ratios computed from the counters assume.
    """

    index: int
    key: str
    converter: Converter | None
    count_miss: bool = True


@dataclass(slots=True)
class Write:
    """Write ``entry`` into tiers ``indices`` in that order; the driver sends back None.

    ``backfill`` writes copy an existing entry; the others are new values (their serialisation
    errors propagate, back-fill errors are skipped). ``fence`` is the flight whose superseding
    (by a ``delete`` during the load) must stop the in-process part of the write.
    """

    indices: Sequence[int]
    key: str
    entry: Entry
    backfill: bool
    fence: Any = None


@dataclass(slots=True)
class AcquireLease:
    index: int
    key: str
    ttl: float


@dataclass(slots=True)
class ReleaseLease:
    index: int
    key: str
    token: str


@dataclass(slots=True)
class WaitForEntry:
    """Wait (bounded) for another process's load; the driver sends back a typed Entry or None."""

    index: int
    key: str
    timeout: float
    converter: Converter | None


@dataclass(slots=True)
class Load:
    """Call the loader under the policy's timeouts; the driver sends back a LoadOutcome.

    ``has_stale`` tells the driver a soft timeout may be applied (there is something to serve).
    ``lease`` is ``(tier index, token)`` while this flight holds a distributed lease: the driver
    keeps extending it for as long as the loader runs, so a slow load does not let other processes
    start their own (a crashed process stops extending, and the lease expires).
    """

    has_stale: bool
    lease: tuple[int, str] | None = None


@dataclass(slots=True)
class LoadOutcome:
    value: Any = None
    error: BaseException | None = None
    started_at: float = 0.0
    duration: float = 0.0
    soft_timed_out: bool = False
    context: Any = None  # the LoadContext the loader saw (adaptive caching)


Operation = Read | Write | AcquireLease | ReleaseLease | WaitForEntry | Load


@dataclass(slots=True)
class Outcome:
    """What a flight produced: the value, its entry (None if not cached), and its source."""

    value: Any
    entry: Entry | None
    source: str  # "L1", "L2"... for a tier hit, else one of Source's names
    tier: str | None = None  # the name of the tier that answered, for tier hits
    refresh: bool = False  # the caller should start a background refresh (SWR)


@dataclass(frozen=True, slots=True)
class FillPlan:
    """The shape of the chain as the flow needs it (built once per cache)."""

    names: tuple[str, ...]
    remote: tuple[int, ...]  # indices walked inside a flight (everything after the L1 prefix)
    lease: int | None  # index of the first tier offering a lease, if any
    write_order: tuple[int, ...]  # bottom-up: shared tiers first, L1 last
    clock: Callable[[], float]


def better_stale(entry: Entry, than: Entry | None) -> bool:
    """The stale candidate to keep: the newest version, and of equal versions the copy that lives
    longest (a tier's clamped copy must not shorten the others' when fail-safe writes it back)."""
    return than is None or (entry.version, entry.stale_until) > (than.version, than.stale_until)


def tier_hit(
    plan: FillPlan, policy: Policy, index: int, entry: Entry, now: float, refresh: bool = False
) -> Outcome:
    """The answer when tier ``index`` (below L1) held ``entry`` fresh at ``now``: the value, and
    whether the caller should start an early (XFetch) refresh. Back-fill is the caller's part."""
    early = not refresh and policy.early_refresh and policy.wants_early_refresh(entry, now)
    return Outcome(entry.value, entry, f"L{index + 1}", plan.names[index], refresh=early)


# --- the flow -----------------------------------------------------------------------------------


def fill_flow(
    plan: FillPlan,
    key: str,
    policy: Policy,
    *,
    stale: Entry | None,
    version: int,
    fence: Any,
    refresh: bool = False,
    build: Callable[[str, Any, Policy, LoadOutcome, int], Entry | None],
    first_read: Any = NOT_READ,
) -> Generator[Operation, Any, Outcome]:
    """Walk the tiers below L1, then lease, load and store. See the module docstring.

    ``stale`` is the best stale entry L1 held (or None). ``refresh`` marks a background refresh
    (SWR or early refresh): it never answers with stale, and re-reads the shared tiers first.
    ``build`` turns a load outcome into the entry to store (None: do not cache it).
    ``first_read`` is what the first tier below L1 answered the caller just before (not fresh),
    if the caller read it: the walk starts below it.
    """
    clock = plan.clock
    now = clock()
    conv = policy.converter

    for index in plan.remote:
        if first_read is NOT_READ:
            entry = yield Read(index, key, conv)
        else:
            entry, first_read = first_read, NOT_READ
        if entry is None:
            continue
        if now < entry.fresh_until and not (refresh and stale is not None and entry.version <= stale.version):
            if index > 0:
                yield Write(range(index), key, entry, backfill=True)
            return tier_hit(plan, policy, index, entry, now, refresh)
        if now < entry.stale_until and better_stale(entry, stale):
            stale = entry

    if stale is not None and not refresh and policy.swr and clock() < stale.stale_until:
        return Outcome(stale.value, stale, Source.STALE_SWR, refresh=True)

    token: str | None = None
    lease = plan.lease
    if lease is not None:
        token = yield AcquireLease(lease, key, policy.lease_ttl)
        if token == NO_LEASE:
            token = None
        elif token is None:
            # Another process is loading: wait for its value (the tier wakes us; never a spin).
            entry = yield WaitForEntry(lease, key, policy.lease_wait, conv)
            if entry is not None and clock() < entry.fresh_until:
                if lease > 0:
                    yield Write(range(lease), key, entry, backfill=True)
                return Outcome(entry.value, entry, f"L{lease + 1}", plan.names[lease])
            if stale is not None and policy.fail_safe and clock() < stale.stale_until:
                return Outcome(stale.value, stale, Source.STALE_FAILSAFE)
            # Deadline passed with nothing usable: load ourselves, without the lease.
        else:
            try:
                entry = yield Read(lease, key, conv, count_miss=False)  # filled just before?
            except BaseException:
                yield ReleaseLease(lease, key, token)
                raise
            if (
                entry is not None
                and clock() < entry.fresh_until
                and not (refresh and stale is not None and entry.version <= stale.version)
            ):
                yield ReleaseLease(lease, key, token)
                if lease > 0:
                    yield Write(range(lease), key, entry, backfill=True)
                return Outcome(entry.value, entry, f"L{lease + 1}", plan.names[lease])

    try:
        holding = None if token is None or lease is None else (lease, token)
        loaded: LoadOutcome = yield Load(has_stale=stale is not None, lease=holding)
        if loaded.error is not None or loaded.soft_timed_out:
            now = clock()
            if stale is not None and policy.fail_safe and now < stale.stale_until:
                if loaded.error is not None and policy.fail_safe_throttle > 0 and not refresh:
                    # Throttle: keep serving the stale value as fresh for a short while, in every
                    # tier (so in every process), instead of calling a failing loader per request.
                    # Same version: any real write since (or after) wins; stale_until unchanged.
                    held = stale.replace(
                        fresh_until=min(now + policy.fail_safe_throttle, stale.stale_until), held=True
                    )
                    yield Write(plan.write_order, key, held, backfill=True, fence=fence)
                return Outcome(stale.value, stale, Source.STALE_FAILSAFE)
            assert loaded.error is not None
            raise loaded.error
        new = build(key, loaded.value, policy, loaded, version)
        if new is not None:
            yield Write(plan.write_order, key, new, backfill=False, fence=fence)
        return Outcome(loaded.value, new, Source.LOADED)
    except GeneratorExit:
        token = None  # abandoned mid-flight (driver gone): the lease expires by its own TTL
        raise
    finally:
        if token is not None and lease is not None:
            # Runs on return, on error and on a thrown driver error; not on generator close.
            yield ReleaseLease(lease, key, token)
