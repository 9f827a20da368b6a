"""Auto-batching: concurrent single-key async reads of one remote tier become one multi-key read.

``ReadCoalescer`` turns concurrent ``get`` calls on one remote tier into one ``get_many``. A read
that finds no other read of the tier in flight on its event loop goes straight out (a lone or
sequential caller pays nothing). Otherwise it opens a batch and yields once (``sleep(0)``);
everyone arriving in that tick joins it, and the opener sends one MGET for all of them and hands
out the answers. So a burst of N reads costs one GET plus one MGET.
"""

from __future__ import annotations

import asyncio

from ._entry import Entry
from ._tier import Tier

__all__ = ["ReadCoalescer"]


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
