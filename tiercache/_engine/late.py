"""A load that outlived its caller's wait: storing its late result, then letting go of the key.

After a soft timeout the load keeps the flight and the lease (see the package essay); after a hard
timeout of a sync loader (which cannot be cancelled) it keeps neither, but its result is still
stored. ``store_late`` writes the result (fenced by the flight's version, like every load);
``end_late`` releases the lease and resolves the flight it kept -- with the late outcome, or with
the loader's error, or with LoaderTimeoutError once ``hard_timeout`` has passed.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

from .._errors import LoaderTimeoutError
from .._flight import Flight
from .._policy import Policy
from .cached import CachedHost
from .commands import LoadOutcome, Outcome, ReleaseLease, Source, Write

__all__ = ["end_late", "store_late"]

logger = logging.getLogger("tiercache")


def store_late(
    host: CachedHost, fence: Flight, policy: Policy, loaded: LoadOutcome
) -> Generator[Write, Any, Outcome]:
    """Store a late result (unless the loader said not to cache it); the outcome for joiners."""
    entry = host.build_entry(fence.key, loaded.value, policy, loaded, fence.version)
    if entry is not None:
        try:
            yield Write(host.plan.write_order, fence.key, entry, backfill=False, fence=fence)
        except Exception as exc:  # nobody is waiting for this write: log it, never raise
            logger.warning("storing a late loader result failed: %s", type(exc).__name__)
    return Outcome(loaded.value, entry, Source.LOADED)


def end_late(
    host: CachedHost,
    fence: Flight,
    policy: Policy,
    lease: tuple[int, str] | None,
    owns_flight: bool,
    outcome: Outcome | None,
    error: BaseException | None,
) -> Generator[ReleaseLease, Any, None]:
    """Release the lease the late load kept and resolve the flight it kept (if it did)."""
    if lease is not None:
        yield ReleaseLease(lease[0], fence.key, lease[1])
    if not owns_flight:
        return
    if outcome is not None:
        host.flights.finish(fence, outcome)
    elif isinstance(error, Exception):
        host.flights.finish(fence, error=error)
    else:
        timeout = LoaderTimeoutError(f"loader did not finish within hard_timeout={policy.hard_timeout}s")
        host.flights.finish(fence, error=timeout)
