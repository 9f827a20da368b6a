"""``get_many_cached``'s flow: ``fill_flow`` for many keys at once (``many_flow``).

Same rules as ``fill_flow`` (entry times checked, back-fill copies unchanged, new entries written
bottom-up, loads fenced by their flights), for the keys this caller leads: one multi-key read per
remote tier for what is still missing, then **one** call of the caller's ``load_many`` for the
rest. Keys the loader does not return are misses, not errors. Batches take no distributed lease
(in-process single-flight still applies, per key).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

from .._entry import Entry
from .._policy import Policy
from .commands import FillPlan, LoadMany, LoadOutcome, ManyResult, Outcome, ReadMany, Source, WriteMany
from .fill import better_stale

__all__ = ["many_flow"]


def many_flow(
    plan: FillPlan,
    keys: Sequence[str],
    policy: Policy,
    *,
    stale: dict[str, Entry],
    versions: dict[str, int],
    fences: dict[str, Any],
    build: Callable[[str, Any, Policy, LoadOutcome, int], Entry | None],
) -> Generator[ReadMany | WriteMany | LoadMany, Any, ManyResult]:
    clock = plan.clock
    now = clock()
    outcomes: dict[str, Outcome] = {}
    missing = list(keys)
    for index in plan.remote:
        if not missing:
            break
        entries: list[Entry | None] = yield ReadMany(index, missing, policy.converter)
        still: list[str] = []
        found: list[tuple[str, Entry]] = []
        for key, entry in zip(missing, entries, strict=True):
            if entry is not None and now < entry.fresh_until:
                outcomes[key] = Outcome(entry.value, entry, f"L{index + 1}", plan.names[index])
                found.append((key, entry))
                continue
            if entry is not None and now < entry.stale_until and better_stale(entry, stale.get(key)):
                stale[key] = entry
            still.append(key)
        if found and index > 0:
            yield WriteMany(range(index), found, backfill=True)
        missing = still

    error: BaseException | None = None
    if missing:
        loaded: LoadOutcome = yield LoadMany(missing)
        if loaded.error is not None:
            error = loaded.error
            for key in missing:
                old = stale.get(key)
                if old is not None and policy.fail_safe and clock() < old.stale_until:
                    outcomes[key] = Outcome(old.value, old, Source.STALE_FAILSAFE)
        else:
            values: dict[str, Any] = loaded.value
            new: list[tuple[str, Entry]] = []
            for key in missing:
                if key not in values:
                    continue  # the loader had nothing for it: a miss, not an error
                entry = build(key, values[key], policy, loaded, versions[key])
                outcomes[key] = Outcome(values[key], entry, Source.LOADED)
                if entry is not None:
                    new.append((key, entry))
            if new:
                yield WriteMany(plan.write_order, new, backfill=False, fences=fences)
    return ManyResult(outcomes, error)
