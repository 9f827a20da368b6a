"""In-process single-flight: one leader per key, joined by asyncio tasks and threads alike.

A :class:`Flight` is resolved exactly once, from whichever thread the leader runs on. Thread
joiners block on a ``threading.Event``; asyncio joiners await a future of their own loop, which
the resolver completes directly when it runs on that loop and through ``call_soon_threadsafe``
otherwise. A joiner that is cancelled only stops waiting; the flight goes on for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from ._entry import next_version

__all__ = ["Flight", "FlightRegistry", "FlightAborted"]


class FlightAborted(Exception):
    """The leader went away without an outcome (its event loop shut down); joiners retry."""


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_FLIGHT_LOCK = threading.Lock()


class Flight:
    """One in-progress fill of one key."""

    __slots__ = (
        "_async_waiters",
        "_event",
        "done",
        "error",
        "key",
        "late",
        "loop",
        "outcome",
        "superseded",
        "version",
    )

    def __init__(self, key: str, version: int, loop: asyncio.AbstractEventLoop | None) -> None:
        self.key = key
        self.version = version
        self.loop = loop  # the leader's event loop (None for a thread leader)
        self.done = False
        self.outcome: Any = None
        self.error: BaseException | None = None
        # Set by delete() while the flight runs: its result must not reach the in-process tiers.
        self.superseded = False
        # Set when its leader answered with stale after a soft timeout and the load goes on:
        # joiners with a stale value of their own serve it at once instead of waiting again.
        self.late = False
        # Made only when somebody joins (most flights have no joiner). All flights share one
        # lock (_FLIGHT_LOCK), held for a few instructions only.
        self._event: threading.Event | None = None
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] | None = None

    def resolve(self, outcome: Any = None, error: BaseException | None = None) -> None:
        with _FLIGHT_LOCK:
            if self.done:
                return
            self.outcome = outcome
            self.error = error
            self.done = True
            waiters, self._async_waiters = self._async_waiters, None
            event = self._event
        if event is not None:
            event.set()
        if not waiters:
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, fut in waiters:
            if loop is current:
                _wake(fut)
            else:
                with contextlib.suppress(RuntimeError):  # a closed loop: its waiter is gone too
                    loop.call_soon_threadsafe(_wake, fut)

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.outcome

    def wait_sync(self, timeout: float | None = None) -> bool:
        """Block the calling thread until resolved; False if ``timeout`` passed first."""
        with _FLIGHT_LOCK:
            if self.done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Wait until resolved; False if ``timeout`` passed first."""
        if self.done:
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with _FLIGHT_LOCK:
            if self.done:
                return True
            if self._async_waiters is None:
                self._async_waiters = []
            self._async_waiters.append((loop, fut))
        timer = None if timeout is None else loop.call_later(timeout, _wake, fut)
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            if not self.done:  # timed out or cancelled: stop being woken
                with _FLIGHT_LOCK:
                    waiters = self._async_waiters
                    if waiters is not None and (loop, fut) in waiters:
                        waiters.remove((loop, fut))
        return self.done

    @property
    def orphaned(self) -> bool:
        """The leader's event loop is closed: nobody can finish this flight any more (a task
        left running when ``asyncio.run`` returned). Joiners abandon it and start anew."""
        return self.loop is not None and self.loop.is_closed()


class FlightRegistry:
    """The flights running in this process, by full key."""

    __slots__ = ("_flights", "_lock")

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self._lock = threading.Lock()

    def join_or_lead(self, key: str, loop: asyncio.AbstractEventLoop | None) -> tuple[Flight, bool]:
        """The running flight for ``key`` (False), or a new one this caller now leads (True)."""
        flights = self._flights
        while True:
            flight = flights.get(key)
            if flight is not None:
                return flight, False
            # No lock: dict.setdefault is one atomic step, so of two racing callers exactly one
            # registers its flight and the other gets it back. (A registered flight is never
            # done: finish() unregisters it before resolving it.) The version is taken before
            # registering, so a flight a little older than a delete can register just after the
            # delete marked the running ones; the delete's floor still keeps its result out of
            # L1, and the shared tiers keep whichever write carries the newer version.
            new = Flight(key, next_version(), loop)
            if flights.setdefault(key, new) is new:
                return new, True

    def finish(self, flight: Flight, outcome: Any = None, error: BaseException | None = None) -> None:
        """Unregister and resolve. Unregister first, so a caller arriving after it starts anew."""
        # Only the flight's own finisher removes it, and nobody can replace a registered flight,
        # so the check and the delete need no lock (a second finish of one flight finds it gone).
        if self._flights.get(flight.key) is flight:
            try:  # noqa: SIM105 -- contextlib.suppress costs more than the rest of finish()
                del self._flights[flight.key]
            except KeyError:
                pass
        flight.resolve(outcome, error)

    def detach(self, flight: Flight) -> None:
        """Unregister ``flight`` without resolving it: callers arriving from now on start a new
        flight instead of joining it (a joiner whose own deadline passed on a hung load). Its
        leader still resolves it for the joiners it has; its result stays fenced by version."""
        if self._flights.get(flight.key) is flight:
            try:  # noqa: SIM105
                del self._flights[flight.key]
            except KeyError:
                pass

    def get(self, key: str) -> Flight | None:
        return self._flights.get(key)

    def supersede_locked(self, key: str, version: int | None = None) -> None:
        """Mark the running flight for ``key`` (if any, and older than ``version``) as overtaken
        by a delete or a newer write: its result will not reach the in-process tiers. The caller
        holds ``lock`` (so the mark is atomic with the floor it raises beside it)."""
        flight = self._flights.get(key)
        if flight is not None and (version is None or flight.version < version):
            flight.superseded = True

    def supersede_prefix(self, prefix: str) -> None:
        """Mark every running flight whose key starts with ``prefix`` (a namespace clear)."""
        with self._lock:
            # A snapshot: flights are registered without the lock, and dict.copy() is one C call
            # (list(items()) allocates per item, so a GC pass could let another thread in).
            for key, flight in self._flights.copy().items():
                if key.startswith(prefix):
                    flight.superseded = True

    @property
    def lock(self) -> threading.Lock:
        """Held while a flight's result is written to in-process tiers (see Runtime.write)."""
        return self._lock

    def __len__(self) -> int:
        return len(self._flights)
