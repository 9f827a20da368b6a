"""The engine's vocabulary: the commands its flows yield to a driver, and what they return.

Every command is a frozen request for I/O or for a driver-owned resource (a thread, a task, a
timer). The driver executes it and sends the result back into the flow; an error the driver
catches is thrown into the flow (a tier's own errors never are: the gateway turns them into a
miss, a skip or ``NO_LEASE``). ``Command`` is the closed union the drivers ``match`` over, so
mypy checks that each driver handles every command.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._entry import Entry
from .._flight import Flight
from .._serde import Converter

__all__ = [
    "NO_LEASE",
    "AcquireLease",
    "ClearAll",
    "Command",
    "DeleteAll",
    "ExpireAll",
    "FillPlan",
    "Join",
    "Load",
    "LoadMany",
    "LoadOutcome",
    "ManyResult",
    "Outcome",
    "Publish",
    "Read",
    "ReadMany",
    "Refresh",
    "ReleaseLease",
    "Source",
    "StoreTagTimes",
    "WaitForEntry",
    "Write",
    "WriteMany",
]


class Source:
    """Where a returned value came from (``Lookup.source``). Tier hits are "L1", "L2"... by
    position in the chain (``Lookup.tier`` names the tier)."""

    LOADED = "LOADED"
    JOINED = "JOINED"
    STALE_SWR = "STALE_SWR"
    STALE_FAILSAFE = "STALE_FAILSAFE"


NO_LEASE = "<no lease>"  # AcquireLease's answer when the lease tier failed: load without one

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
    """Call the loader; the driver sends back a LoadOutcome.

    ``soft``: seconds after which the driver stops waiting and answers ``soft_timed_out`` (the
    load goes on, see ``_engine.late``); set only when a stale value can be served and it comes
    before ``hard``. ``hard``: seconds after which the load has failed with LoaderTimeoutError.
    ``lease`` is ``(tier index, token)`` while this flight holds a distributed lease: the driver
    keeps extending it for as long as the loader runs, so a slow load does not let other processes
    start their own (a crashed process stops extending, and the lease expires).
    """

    soft: float | None = None
    hard: float | None = None
    lease: tuple[int, str] | None = None


@dataclass(slots=True)
class LoadOutcome:
    value: Any = None
    error: BaseException | None = None
    started_at: float = 0.0
    duration: float = 0.0
    soft_timed_out: bool = False
    context: Any = None  # the LoadContext the loader saw (adaptive caching)


@dataclass(slots=True)
class Outcome:
    """What a flight produced: the value, its entry (None if not cached), and its source."""

    value: Any
    entry: Entry | None
    source: str  # "L1", "L2"... for a tier hit, else one of Source's names
    tier: str | None = None  # the name of the tier that answered, for tier hits
    refresh: bool = False  # the caller should start a background refresh (SWR)
    # A soft timeout answered with stale while the load goes on: the flight (and the lease) now
    # belong to the driver's late finisher, which stores the result and then resolves the flight.
    late: bool = False


@dataclass(frozen=True, slots=True)
class FillPlan:
    """The shape of the chain as the flow needs it (built once per cache)."""

    names: tuple[str, ...]
    remote: tuple[int, ...]  # indices walked inside a flight (everything after the L1 prefix)
    lease: int | None  # index of the first tier offering a lease, if any
    write_order: tuple[int, ...]  # bottom-up: shared tiers first, L1 last
    clock: Callable[[], float]


@dataclass(slots=True)
class ReadMany:
    """Read ``keys`` from tier ``index`` in one round trip; the driver sends back a list of typed
    entries or None, in order (a failed read is all misses)."""

    index: int
    keys: Sequence[str]
    converter: Converter | None


@dataclass(slots=True)
class WriteMany:
    """Write ``items`` into tiers ``indices`` (one batch per tier); ``fences`` maps a key to the
    flight whose supersession (a delete during the load) must stop its in-process write."""

    indices: Sequence[int]
    items: Sequence[tuple[str, Entry]]
    backfill: bool
    fences: dict[str, Any] | None = None


@dataclass(slots=True)
class LoadMany:
    """Call the caller's batch loader for ``keys``; the driver sends back a LoadOutcome whose
    value is a dict of full key -> value (keys it did not return are absent)."""

    keys: Sequence[str]


@dataclass(slots=True)
class ManyResult:
    outcomes: dict[str, Outcome]
    error: BaseException | None  # the loader's error, for keys that got neither value nor stale


# --- the public operations' commands (set, delete, expire, invalidate_tags, clear) ---------------


@dataclass(slots=True)
class DeleteAll:
    """Delete ``key`` at ``version`` from every tier, shared tiers first (tombstones where kept)."""

    key: str
    version: int


@dataclass(slots=True)
class ExpireAll:
    """Mark ``key`` stale at ``at`` in every tier (shared first), under ``version``."""

    key: str
    at: float
    version: int


@dataclass(slots=True)
class ClearAll:
    """Remove every key of the namespace ``prefix`` from every tier that can."""

    prefix: str


@dataclass(slots=True)
class StoreTagTimes:
    """Record ``at`` as the invalidation time of ``tags`` in the shared tag store (if any)."""

    tags: Sequence[str]
    at: float


@dataclass(slots=True)
class Publish:
    """Tell other processes (the bus, if any): ``op`` on ``keys``/``tags`` at ``version``."""

    op: str
    keys: Sequence[str]
    tags: Sequence[str]
    version: int
    at: float


# --- get_cached's commands for driver-owned resources (waiting, background work, the fence) -------


@dataclass(slots=True)
class Join:
    """Wait for ``flight`` at most ``limit`` seconds (None: no limit); the driver sends back True
    when it was resolved (or found dead and ended with FlightAborted), False at the limit."""

    flight: Flight
    limit: float | None


@dataclass(slots=True)
class Refresh:
    """Start a background refresh of ``key`` (a thread or a task running ``lead_flow`` with
    ``refresh=True``) unless a flight for it is running; ``current`` is the entry served now."""

    key: str
    current: Entry | None


Command = (
    Read
    | Write
    | AcquireLease
    | ReleaseLease
    | WaitForEntry
    | Load
    | ReadMany
    | WriteMany
    | LoadMany
    | DeleteAll
    | ExpireAll
    | ClearAll
    | StoreTagTimes
    | Publish
    | Join
    | Refresh
)
