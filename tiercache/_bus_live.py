"""Bus liveness: bounded per-origin sequence state, and the heartbeat that detects a silent bus.

Pub/sub loses messages silently (a black-holed socket, a node that died with its subscribers).
So every cache with a bus that offers ``liveness`` (seconds, e.g. ``RedisBus(liveness=1.0)``)
publishes a ``beat`` every ``liveness / 5`` seconds, sequence-numbered like every other message,
and a watchdog checks every ``liveness / 20`` seconds:

* **deaf**: our own beats have not come back for ``0.6 * liveness``: whatever we publish, we do
  not hear, so we do not hear the others either. L1 is cleared and takes nothing until our own
  beat is heard again (then it is cleared once more and a floor refuses reads that started
  while deaf). A publish that fails makes us deaf at once: we cannot tell the others, and the
  same fault may hide their messages from us;
* **silent origin**: a process that was beating has not been heard for ``0.6 * liveness``: its
  messages may be lost on their way to us (its node died, its publishes fail). L1 is cleared and
  the origin is remembered as *missing*; while any origin is missing (up to ``5 * liveness`` after
  it was last heard) L1 takes nothing, since its later writes would not reach us either. A process
  that closes says ``bye`` and is forgotten without any of this;
* a **gap** in an origin's sequence numbers clears L1 as before: with beats, a lost message is
  noticed within one beat interval.

So a stale L1 read is bounded by about ``liveness`` after the write, whatever breaks. The
per-origin state is bounded (``capacity`` origins, least recently heard dropped first).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["Gone", "Origins", "Pulse", "watch_process"]


class Gone(Exception):
    """Raised by a pulse callback whose owner was garbage-collected: the thread ends."""


class Origins:
    """Sequence numbers and last-heard times of the other processes on the channel."""

    __slots__ = ("_beating", "_seq", "capacity", "missing")

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._seq: OrderedDict[str, int] = OrderedDict()  # least recently heard first
        self._beating: OrderedDict[str, float] = OrderedDict()  # origin -> last heard, oldest first
        self.missing: OrderedDict[str, float] = OrderedDict()  # origin -> missing until

    def __len__(self) -> int:
        return len(self._seq)

    def observe(self, origin: str, seq: int, now: float, beats: bool) -> str:
        """``first``, ``next``, ``gap`` (messages lost) or ``late`` (an old or repeated number)."""
        last = self._seq.get(origin)
        if last is not None and seq <= last:
            verdict = "late"
        else:
            self._seq[origin] = seq
            verdict = "first" if last is None else "next" if seq == last + 1 else "gap"
        self._seq.move_to_end(origin)
        if len(self._seq) > self.capacity:
            gone, _ = self._seq.popitem(last=False)
            self._beating.pop(gone, None)
        if beats or origin in self._beating:
            self._beating[origin] = now
            self._beating.move_to_end(origin)
        if self.missing.pop(origin, None) is not None and verdict != "late":
            verdict = "gap"  # back after being missing: whatever it sent meanwhile is lost
        return verdict

    def forget(self, origin: str) -> None:
        self._seq.pop(origin, None)
        self._beating.pop(origin, None)
        self.missing.pop(origin, None)

    def reset(self) -> None:
        """After a reconnection: every sequence starts afresh (L1 is cleared by the caller)."""
        self._seq.clear()
        self._beating.clear()
        self.missing.clear()

    def silent(self, now: float, limit: float, hold: float) -> list[str]:
        """Pop the beating origins not heard for ``limit`` seconds; they become missing."""
        out: list[str] = []
        beating = self._beating
        while beating:
            origin, heard = next(iter(beating.items()))
            if now - heard <= limit:
                break
            del beating[origin]
            self._seq.pop(origin, None)
            self.missing[origin] = heard + hold
            out.append(origin)
        while len(self.missing) > self.capacity:
            self.missing.popitem(last=False)
        return out

    def any_missing(self, now: float) -> bool:
        missing = self.missing
        while missing:
            origin, until = next(iter(missing.items()))
            if until > now:
                return True
            del missing[origin]
        return False


class Pulse:
    """Two daemon threads: one publishes beats, one runs the watchdog (so a publish stuck on a
    black-holed socket cannot delay the check)."""

    def __init__(
        self, liveness: float, beat: Callable[[], None], check: Callable[[], None], name: str
    ) -> None:
        self.liveness = liveness
        self._beat = beat
        self._check = check
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(beat, liveness / 5), name=f"{name}-beat", daemon=True),
            threading.Thread(
                target=self._loop, args=(check, liveness / 20), name=f"{name}-watch", daemon=True
            ),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self, fn: Callable[[], None], every: float) -> None:
        while not self._stop.wait(every):
            try:
                fn()
            except Gone:
                return
            except Exception:  # never let the watchdog die; the callbacks log themselves
                pass


_beating: weakref.WeakSet[Any] = weakref.WeakSet()  # objects with stop() and after_fork()
_hooks_lock = threading.Lock()
_hooked = False


def watch_process(owner: Any) -> None:
    """Call ``owner.stop()`` at interpreter exit (so peers get a goodbye, not a silence) and
    ``owner.after_fork()`` in a forked child (threads do not survive fork). Hooks are installed
    on first use, never at import."""
    global _hooked
    with _hooks_lock:
        _beating.add(owner)
        if _hooked:
            return
        _hooked = True
    atexit.register(_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _at_exit() -> None:
    for owner in list(_beating):
        with contextlib.suppress(Exception):
            owner.stop()


def _after_fork_in_child() -> None:
    global _hooks_lock
    _hooks_lock = threading.Lock()
    for owner in list(_beating):
        with contextlib.suppress(Exception):
            owner.after_fork()
