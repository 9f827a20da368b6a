"""Batches: ``get_many_cached``'s flow, and auto-batching of concurrent single-key remote reads.

``many_flow`` is the batch counterpart of ``fill_flow`` (same rules: entry times checked, back-fill
copies unchanged, new entries written bottom-up, loads fenced by their flights), for keys this
caller leads: one multi-key read per remote tier for what is still missing, then **one** call of
the caller's ``load_many`` for the rest. Keys the loader does not return are misses, not errors.
Batches take no distributed lease (in-process single-flight still applies, per key).

``ReadCoalescer`` turns concurrent ``get`` calls on one remote tier into one ``get_many``. A read
that finds no other read of the tier in flight on its event loop goes straight out (a lone or
sequential caller pays nothing). Otherwise it opens a batch and yields once (``sleep(0)``);
everyone arriving in that tick joins it, and the opener sends one MGET for all of them and hands
out the answers. So a burst of N reads costs one GET plus one MGET.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from ._entry import Entry
from ._flow import FillPlan, LoadOutcome, Outcome, Source, better_stale
from ._policy import Policy
from ._serde import Converter
from ._tier import Tier

__all__ = ["LoadMany", "ManyResult", "ReadCoalescer", "ReadMany", "WriteMany", "many_flow"]


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


class _Batch:
    __slots__ = ("futures", "keys")

    def __init__(self, key: str) -> None:
        self.keys = [key]
        self.futures: list[asyncio.Future[Entry | None] | None] = [None]


class ReadCoalescer:
    """Coalesces concurrent single-key reads of one remote tier into multi-key reads."""

    def __init__(self, tier: Tier, max_batch: int = 500) -> None:
        self.tier = tier
        self.max_batch = max_batch
        self._open: dict[asyncio.AbstractEventLoop, _Batch] = {}
        self._in_flight: dict[asyncio.AbstractEventLoop, int] = {}
        self.batches = 0  # multi-key reads sent (for tests and benchmarks)

    async def get(self, key: str) -> Entry | None:
        loop = asyncio.get_running_loop()
        in_flight = self._in_flight
        busy = in_flight.get(loop, 0)
        in_flight[loop] = busy + 1
        try:
            if not busy:
                return await self.tier.aget(key)  # alone: no batching, no extra loop turn
            return await self._batched(loop, key)
        finally:
            left = in_flight[loop] - 1
            if left:
                in_flight[loop] = left
            else:
                del in_flight[loop]

    async def _batched(self, loop: asyncio.AbstractEventLoop, key: str) -> Entry | None:
        batch = self._open.get(loop)
        if batch is not None:
            fut: asyncio.Future[Entry | None] = loop.create_future()
            batch.keys.append(key)
            batch.futures.append(fut)
            if len(batch.keys) >= self.max_batch:
                del self._open[loop]  # full: the next caller opens a new one
            return await fut
        batch = _Batch(key)
        self._open[loop] = batch
        try:
            await asyncio.sleep(0)  # one loop turn: let this tick's other readers join
        except asyncio.CancelledError:
            self._close(loop, batch)
            self._hand_over(loop, batch)
            raise
        self._close(loop, batch)
        return await self._read(batch)

    def _close(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> None:
        if self._open.get(loop) is batch:
            del self._open[loop]

    async def _read(self, batch: _Batch) -> Entry | None:
        keys, futures = batch.keys, batch.futures
        try:
            if len(keys) == 1:
                entries: list[Entry | None] = [await self.tier.aget(keys[0])]
            else:
                self.batches += 1
                entries = await self.tier.aget_many(keys)
        except asyncio.CancelledError:
            self._hand_over(asyncio.get_running_loop(), batch)
            raise
        except Exception as exc:
            for fut in futures[1:]:
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
            raise
        for fut, entry in zip(futures[1:], entries[1:], strict=True):
            if fut is not None and not fut.done():
                fut.set_result(entry)
        return entries[0]

    def _hand_over(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> None:
        """The opener was cancelled: read for the others in a task of their own."""
        others = [(k, f) for k, f in zip(batch.keys[1:], batch.futures[1:], strict=True) if f is not None]
        if not others:
            return
        rest = _Batch(others[0][0])
        rest.keys = [k for k, _ in others]
        rest.futures = [None, *(f for _, f in others[1:])]
        first = others[0][1]

        async def finish() -> None:
            try:
                entry = await self._read(rest)
            except Exception as exc:
                if not first.done():
                    first.set_exception(exc)
                return
            if not first.done():
                first.set_result(entry)

        task = loop.create_task(finish())
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()
