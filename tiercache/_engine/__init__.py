"""The cache algorithm, once: sans-I/O flows that the sync and async drivers run.

Theory of operation
-------------------
A cache is a chain of tiers, fastest first. The leading *in-process* tiers (L1) are read by every
caller, inline: by the decorators' and ``get_cached``'s fast path when the first tier offers it
(``InlineL1``), else by the drivers' L1 walk. Nothing here runs on an L1 hit. A fresh hit may ask
for an *early refresh* (XFetch: ``early_refresh_ratio``/``_beta``); a stale L1 entry is served at
once with ``swr=True`` while one background refresh runs; otherwise it is kept as the fail-safe
candidate.

On an L1 miss exactly one caller per key per process -- the *flight leader* -- runs
:func:`~.cached.lead_flow`; every other caller (asyncio task or thread) joins its flight and shares
its outcome (``_flight``). So 100 callers of a cold key cost one lease and one load. A joiner
keeps its own deadlines: it waits at most its ``soft_timeout`` when it has a stale value to serve
(then serves it), else at most its ``hard_timeout``, after which it *detaches* the hung flight (no
later caller joins it) and leads a new one (:func:`~.fill.join_limit`). A flight whose leader's
event loop has closed (an ``asyncio.run`` that returned under it) is ended by its joiners.

``lead_flow`` reads the first shared tier, ``fill_flow`` the others below L1, in order. A fresh
entry is back-filled, unchanged, into the tiers above it and returned. Otherwise the flow takes
the distributed *lease* of the first tier that offers one: if another process holds it, the flow
waits (woken, never polling) up to ``lease_wait`` for that process's value, then serves stale
(fail-safe) or loads without the lease. Holding it, the flow re-reads the lease tier once (someone
may have just written) and calls the loader, whose lease the driver extends every third of
``lease_ttl`` while it runs (a lease tier whose acquire failed on the client side removes what it
may have taken on the server). The result is
built into an entry carrying the version taken when the flight *started*, and written bottom-up.

Timeouts: past ``soft_timeout`` with a stale value to serve, the caller gets the stale value and
the load goes on: the flight *and the lease* stay with it (the driver waits for it, then
:mod:`.late` stores the result, releases the lease and resolves the flight), so no second load
starts, here or elsewhere; callers meanwhile serve their stale value at once (the flight is
marked late).
Past ``hard_timeout`` the caller gets ``LoaderTimeoutError`` (or fail-safe stale): an async loader
is cancelled, a sync one cannot be, so its late result is still stored -- fenced by version like
every write, so anything newer written meanwhile wins. A failing loader with a stale value answers
with it (fail-safe) and writes it back fresh for ``fail_safe_throttle`` seconds, same version, so
every process stops calling the failing loader for a while.

Cancellation is the drivers' part: a cancelled async leader raises ``CancelledError`` (also when a
tier client swallowed the cancel: ``Task.cancelling()`` is checked after each await) and hands its
flow, mid-command, to a take-over task that finishes it for the joiners; a cancelled *background*
refresh is abandoned instead (nobody waits on it, and its loop is usually ending).

Coherence: ``set``/``delete``/``expire`` raise the key's *floor* and mark a running flight
superseded before touching any tier; ``clear`` and a bus reset raise the namespace's floor. An L1
write checks floor and mark under the flight registry's lock, so a copy read or loaded before an
invalidation never lands in L1 after it. Shared tiers refuse an older version themselves
(set-if-newer, tombstones), and when they refuse, L1 is not written either.

Where things live: :mod:`.commands` (the typed command union the drivers ``match`` over, and the
results), :mod:`.cached` (``get_cached`` after the L1 walk: ``cached_flow``, ``lead_flow``, and
``many_cached_flow`` for ``get_many_cached``), :mod:`.fill` (``fill_flow``, the timeouts a load
runs under, a joiner's limits), :mod:`.many` (``many_flow``, ``fill_flow`` for a batch of keys),
:mod:`.late` (storing a late result and letting go of its flight and lease), :mod:`.ops` (get,
set, delete, expire, tags, clear). The drivers (``_sync``, ``_async``) walk L1, execute commands,
own threads, tasks, timers and cancellation, and make no cache decision; every call into a shared
tier goes through the tier gateway (``_gateway``: error policy, breakers, events, coalescing). A
flow that leads a flight puts it in the driver's fence slot (its loads' fence, and what a
cancelled async leader hands to a take-over task).

Invariants (tests/property checks them):

1. Nothing past ``stale_until`` is ever returned: every candidate is checked against the clock.
2. A stale entry is returned only when the policy asks for it (SWR, or fail-safe after a failed or
   too-slow load); otherwise it is only remembered as a fail-safe candidate.
3. Back-fill copies the entry *unchanged* into the tiers above the one it was found in, so its
   absolute times come along and its life is never extended (tiers clamp, never extend).
4. New entries are written bottom-up (shared tiers first, L1 last), so an L1 copy never exists
   without the shared copy it came from; a copy a shared tier refused is not written to L1.
5. A loaded entry carries the version taken when its flight *started*; a ``set`` or ``delete`` that
   lands during the load has a larger version, and tiers refuse to let the older one overwrite it.
6. A lease taken is released on every path out (value written, loader failed, driver error), by
   the late finisher after a soft timeout, or expires by its TTL if the process dies.
7. A fail-safe answer throttles the loader by writing the stale entry back *unchanged but for
   fresh_until* (same version, same stale_until): every process then serves it for the throttle
   window, and any real write or delete, having a larger version, still wins.
"""

from __future__ import annotations

from .commands import (
    NO_LEASE,
    AcquireLease,
    ClearAll,
    Command,
    DeleteAll,
    ExpireAll,
    FillPlan,
    Join,
    Load,
    LoadMany,
    LoadOutcome,
    ManyResult,
    Outcome,
    Publish,
    Read,
    ReadMany,
    Refresh,
    ReleaseLease,
    Source,
    StoreTagTimes,
    WaitForEntry,
    Write,
    WriteMany,
)
from .fill import better_stale, fill_flow, join_limit, load_timeouts, tier_hit
from .many import many_flow

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
    "better_stale",
    "fill_flow",
    "join_limit",
    "load_timeouts",
    "many_flow",
    "tier_hit",
]
