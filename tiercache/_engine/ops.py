"""The public operations besides ``get_cached``, as flows: get, set, delete, expire, tags, clear.

Each one is the whole decision of its operation -- what is invalidated locally first, which tiers
are written in which order, what other processes are told -- and yields only I/O. The local
invalidation (floors, superseded flights, L1 copies) happens *before* the tiers are touched, so a
load already running cannot store an older result after this write (see the package essay).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from .._coherence import Coherence
from .._entry import Entry
from .._errors import ValueTooLargeError
from .commands import ClearAll, DeleteAll, ExpireAll, FillPlan, Publish, Read, StoreTagTimes, Write
from .fill import better_stale

__all__ = ["clear_flow", "delete_flow", "expire_flow", "get_flow", "set_flow", "tags_flow"]


def get_flow(
    plan: FillPlan, key: str, conv: Any, stale: Entry | None, now: float, allow_stale: bool
) -> Generator[Read | Write, Any, tuple[bool, Any]]:
    """Read through the tiers below L1 without loading: ``(True, value)`` for a fresh entry
    (back-filled above where it was found), or the best stale one if ``allow_stale``; else
    ``(False, None)``. ``stale`` is the best stale entry L1 held."""
    for index in plan.remote:
        entry: Entry | None = yield Read(index, key, conv)
        if entry is None:
            continue
        if now < entry.fresh_until:
            if index > 0:
                yield Write(range(index), key, entry, backfill=True)
            return True, entry.value
        if now < entry.stale_until and better_stale(entry, stale):
            stale = entry
    if allow_stale and stale is not None:
        return True, stale.value
    return False, None


def set_flow(co: Coherence, plan: FillPlan, key: str, entry: Entry) -> Generator[Write | Publish, Any, None]:
    """Write a new value everywhere, bottom-up, then tell the others."""
    co.ensure_started()
    # A load of this key already running started before this write: it must not store its
    # (older) result, even in an L1 that has meanwhile evicted this entry.
    co.invalidate_locally(key, entry.version, "mark")
    written: int = yield Write(plan.write_order, key, entry, backfill=False)
    if written < 0:
        raise ValueTooLargeError(f"the value for {key!r} is too large for every tier")
    yield Publish("set", (key,), (), entry.version, entry.created_at)


def delete_flow(
    co: Coherence, key: str, version: int, now: float
) -> Generator[DeleteAll | Publish, Any, None]:
    co.invalidate_locally(key, version, "delete")
    yield DeleteAll(key, version)
    yield Publish("delete", (key,), (), version, now)


def expire_flow(
    co: Coherence, key: str, version: int, at: float
) -> Generator[ExpireAll | Publish, Any, None]:
    co.invalidate_locally(key, version, "mark")
    yield ExpireAll(key, at, version)
    yield Publish("expire", (key,), (), version, at)


def tags_flow(
    co: Coherence, tags: Sequence[str], version: int, at: float
) -> Generator[StoreTagTimes | Publish, Any, None]:
    co.invalidate_tags_locally(tags, at)
    yield StoreTagTimes(tags, at)
    yield Publish("tags", (), tags, version, at)


def clear_flow(co: Coherence, version: int, now: float) -> Generator[ClearAll | Publish, Any, None]:
    co.cleared(version)  # floors first: nothing read before the clear may land in L1 after it
    yield ClearAll(co.prefix)
    yield Publish("clear", (), (), version, now)
