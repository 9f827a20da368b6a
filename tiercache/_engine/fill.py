"""The flight leader's flow: the walk below L1, the lease, the load and the store (``fill_flow``).

See the package's theory of operation (``tiercache._engine``) for the whole algorithm and the
invariants this flow keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from .._entry import Entry
from .._errors import LoaderTimeoutError
from .._policy import Policy
from .commands import (
    NO_LEASE,
    AcquireLease,
    FillPlan,
    Load,
    LoadOutcome,
    Outcome,
    Read,
    ReleaseLease,
    Source,
    WaitForEntry,
    Write,
)

__all__ = ["FillOp", "better_stale", "fill_flow", "join_limit", "load_timeouts", "tier_hit"]

NOT_READ: Any = object()  # fill_flow(first_read=...): the caller did not read the first tier

FillOp = Read | Write | AcquireLease | ReleaseLease | WaitForEntry | Load  # what fill_flow yields


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


def load_timeouts(policy: Policy, has_stale: bool) -> tuple[float | None, float | None]:
    """The timeouts a load runs under: ``(soft, hard)``. The soft one applies only when there is a
    stale value to serve (and fail-safe allows serving it) and it comes before the hard one."""
    soft, hard = policy.soft_timeout, policy.hard_timeout
    if not (has_stale and policy.fail_safe) or (soft is not None and hard is not None and soft >= hard):
        soft = None
    return soft, hard


def join_limit(policy: Policy, stale: Entry | None, now: float) -> tuple[float | None, bool]:
    """How long a caller that joined a running flight waits for it, and what it does then.

    ``(seconds, True)``: serve the stale entry after ``seconds`` (the caller's own soft timeout,
    as if it had led). ``(seconds, False)``: the caller's own ``hard_timeout``; after it the hung
    flight is detached (later callers do not join it) and the caller leads a new one. ``None``
    seconds: wait for the flight however long it takes (no deadline of its own)."""
    soft, hard = policy.soft_timeout, policy.hard_timeout
    if (
        stale is not None
        and policy.fail_safe
        and soft is not None
        and (hard is None or soft < hard)
        and now + soft < stale.stale_until
    ):
        return soft, True
    return hard, False


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
) -> Generator[FillOp, Any, Outcome]:
    """Walk the tiers below L1, then lease, load and store. See the module docstring.

    ``stale`` is the best stale entry L1 held (or None). ``refresh`` marks a background refresh
    (SWR or early refresh): it never answers with stale, and re-reads the shared tiers first.
    ``build`` turns a load outcome into the entry to store (None: do not cache it).
    ``first_read`` is what the first tier below L1 answered just before (not fresh), when the
    caller (``lead_flow``) read it: the walk takes it instead of reading that tier again.
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
            # Another process is loading: wait for its value (the tier wakes us; never a spin),
            # at most lease_wait -- or our soft timeout, when we have a stale value to serve.
            wait = policy.lease_wait
            soft, _ = load_timeouts(policy, stale is not None)
            if soft is not None:
                wait = min(wait, soft)
            entry = yield WaitForEntry(lease, key, wait, conv)
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
        soft, hard = load_timeouts(policy, stale is not None)
        loaded: LoadOutcome = yield Load(soft, hard, lease=holding)
        if loaded.soft_timed_out:
            # The load goes on: the lease stays held (and extended) until its result is stored,
            # so no other process starts the same load; the driver's late finisher releases it.
            token = None
            if stale is not None and clock() < stale.stale_until:
                return Outcome(stale.value, stale, Source.STALE_FAILSAFE, late=True)
            raise LoaderTimeoutError("the loader passed soft_timeout and the stale value expired meanwhile")
        if loaded.error is not None:
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
