"""An injectable wall clock for tests (no pytest needed)."""

from __future__ import annotations

import threading
import time

__all__ = ["FakeClock"]


class FakeClock:
    """A settable wall clock: call it for the time, ``advance`` it instead of sleeping.

    Starts at the real time by default so that tiers with server-side TTLs (Redis, KV) see
    sensible absolute times.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def set(self, now: float) -> None:
        self._now = now
