"""Fault-injection harness: a steerable TCP proxy, a bounded fault schedule, and a history checker.

Everything here is bounded in count and time and stops itself: a schedule runs a fixed list of
steps on one thread that gives up at its deadline, and every fault it starts is undone (the proxy
back to ``pass``, a killed Redis restarted) before the schedule returns, even on error.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from tiercache import Event, EventKind

HOST = "127.0.0.1"

# --- the proxy ----------------------------------------------------------------------------------


class FaultProxy:
    """A loopback TCP proxy in front of ``target_port`` with the faults a network can have.

    Modes (``set_mode``): ``pass`` forwards bytes; ``delay`` forwards each chunk after ``delay``
    seconds (both directions, so a round trip costs about twice that); ``stall`` keeps connections
    open and forwards nothing (a hung server, a black hole); ``drop`` closes every connection
    gracefully (FIN) and accepts-then-closes new ones (a server that goes away). ``reset()``
    aborts every open connection with an RST and stays in the current mode.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "pass"
        self.delay = 0.0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(256)
        self.port = int(self._listener.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self.accepted = 0
        self.resets = 0
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        if mode not in ("pass", "delay", "stall", "drop"):
            raise ValueError(mode)
        self.delay = delay
        self.mode = mode
        if mode == "drop":
            self._close_all(abort=False)

    def reset(self) -> None:
        self.resets += 1
        self._close_all(abort=True)

    def _close_all(self, *, abort: bool) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                if abort:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                else:
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self._close_all(abort=True)
        self._thread.join(timeout=2)

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.05)
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            if self.mode == "drop":
                client.close()
                continue
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=1)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            src.settimeout(0.02)
            while not self._closed:
                if self.mode == "stall":
                    time.sleep(0.01)  # leave the bytes unread: the peer sees a silent server
                    continue
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                while self.mode == "stall" and not self._closed:
                    time.sleep(0.01)
                if self.mode == "delay" and self.delay > 0:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


# --- the schedule -------------------------------------------------------------------------------


@dataclass
class Step:
    """At ``at`` seconds after the start, run ``start``; ``duration`` seconds later run ``end``."""

    at: float
    name: str
    start: Callable[[], None]
    duration: float = 0.0
    end: Callable[[], None] | None = None


@dataclass
class FaultWindow:
    name: str
    started: float  # wall clock (time.time), the cache's clock
    ended: float


class FaultSchedule:
    """Runs ``steps`` on one thread, once each, and stops by ``deadline`` seconds at the latest.

    ``windows`` records when each fault was active (wall clock). Every ``end`` runs even when the
    schedule is stopped early, so a test never leaves a proxy stalled or a Redis down.
    """

    def __init__(self, steps: Sequence[Step], deadline: float) -> None:
        self.steps = sorted(steps, key=lambda s: s.at)
        self.deadline = deadline
        self.windows: list[FaultWindow] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-schedule", daemon=True)
        self.t0 = 0.0

    def start(self) -> FaultSchedule:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.deadline + 10)

    def _wait_until(self, offset: float) -> bool:
        """False if stopped or past the deadline first."""
        target = min(offset, self.deadline)
        remaining = self.t0 + target - time.monotonic()
        if remaining > 0 and self._stop.wait(remaining):
            return False
        return offset <= self.deadline

    def _run(self) -> None:
        for step in self.steps:
            if not self._wait_until(step.at):
                return
            started = time.time()
            try:
                step.start()
                if step.end is not None:
                    self._wait_until(step.at + step.duration)
            except BaseException as exc:
                self.errors.append(exc)
            finally:
                if step.end is not None:
                    try:
                        step.end()
                    except BaseException as exc:
                        self.errors.append(exc)
                self.windows.append(FaultWindow(step.name, started, time.time()))

    @property
    def injected(self) -> int:
        return len(self.windows)


# --- the history and its checker -----------------------------------------------------------------

# Events of the operation running in this thread or task (see History.op).
_current_events: ContextVar[list[Event] | None] = ContextVar("faults_current_events", default=None)


@dataclass
class Produced:
    kind: str  # "load" or "set"
    start: float


@dataclass
class WriteRecord:
    key: str
    kind: str  # "set" or "delete"
    seq: int | None
    start: float
    end: float
    durable: bool  # no tier error or skip during the call: every remote tier took it


@dataclass
class ReadRecord:
    key: str
    start: float
    end: float
    value: Any
    stale_served: bool


@dataclass
class Verdict:
    wrong: list[str] = field(default_factory=list)  # foreign, unknown or too old values
    superseded: list[str] = field(default_factory=list)  # older than a durable write before the read
    stale_served: int = 0
    reads: int = 0


class History:
    """Every value produced, every write acknowledged and every value read, with times.

    Values are ``{"k": key, "s": seq}``: ``seq`` comes from one counter, so a value names the
    operation (load or set) that produced it. Times are wall-clock (the cache's clock).
    """

    def __init__(self, remote_tiers: Sequence[str]) -> None:
        self.remote = frozenset(remote_tiers)
        self.produced: dict[tuple[str, int], Produced] = {}
        self.writes: list[WriteRecord] = []
        self.reads: list[ReadRecord] = []
        self.latencies: list[tuple[float, float]] = []  # (start, seconds)
        self.errors: list[BaseException] = []
        self.events: list[tuple[float, Event]] = []  # remote-tier and breaker events, timed
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    # the cache's on_event hook
    def on_event(self, event: Event) -> None:
        ops = _current_events.get()
        if ops is not None:
            ops.append(event)
        if event.tier in self.remote or event.kind == EventKind.STALE_SERVED:
            self.events.append((time.time(), event))

    def produce(self, key: str, kind: str) -> dict[str, Any]:
        with self._lock:
            seq = next(self._seq)
            self.produced[(key, seq)] = Produced(kind, time.time())
        return {"k": key, "s": seq}

    @contextlib.contextmanager
    def op(self) -> Iterator[list[Event]]:
        """Collect the events of one call made in this thread or task."""
        events: list[Event] = []
        token = _current_events.set(events)
        try:
            yield events
        finally:
            _current_events.reset(token)

    def durable(self, events: Sequence[Event]) -> bool:
        return not any(
            e.tier in self.remote and e.kind in (EventKind.TIER_ERROR, EventKind.TIER_SKIPPED) for e in events
        )

    def record_read(self, key: str, start: float, value: Any, events: Sequence[Event]) -> None:
        end = time.time()
        stale = any(e.kind == EventKind.STALE_SERVED for e in events)
        with self._lock:
            self.reads.append(ReadRecord(key, start, end, value, stale))
            self.latencies.append((start, end - start))

    def record_write(
        self, key: str, kind: str, seq: int | None, start: float, events: Sequence[Event]
    ) -> None:
        end = time.time()
        with self._lock:
            self.writes.append(WriteRecord(key, kind, seq, start, end, self.durable(events)))
            self.latencies.append((start, end - start))

    def record_error(self, exc: BaseException, start: float) -> None:
        with self._lock:
            self.errors.append(exc)
            self.latencies.append((start, time.time() - start))

    def check(self, *, ttl: float, stale_ttl: float, delay: float, slack: float = 0.05) -> Verdict:
        """Judge every read. A value must be one produced for its key; not older than ``ttl``
        (``ttl + stale_ttl`` when it was served stale), give or take ``slack``; and not older than
        the last write that every tier took and that was acknowledged more than ``delay`` seconds
        before the read began. "Not older" means: produced after that write began, or by a ``set``
        that overlapped it in time (two concurrent writes may land in either order)."""
        verdict = Verdict(reads=len(self.reads))
        stale_times = [(t, e.key) for t, e in self.events if e.kind == EventKind.STALE_SERVED]
        durable: dict[str, list[WriteRecord]] = {}
        set_by_seq: dict[int, WriteRecord] = {}
        for w in sorted(self.writes, key=lambda w: w.end):
            if w.seq is not None:
                set_by_seq[w.seq] = w
            if w.durable:
                durable.setdefault(w.key, []).append(w)
        for r in self.reads:
            v = r.value
            if not isinstance(v, dict) or v.get("k") != r.key:
                verdict.wrong.append(f"{r.key}: foreign value {v!r}")
                continue
            made = self.produced.get((v["k"], v.get("s", -1)))
            if made is None:
                verdict.wrong.append(f"{r.key}: value never produced {v!r}")
                continue
            stale = r.stale_served or any(
                k.endswith(":" + r.key) and r.start - slack <= t <= r.end + slack for t, k in stale_times
            )
            verdict.stale_served += stale
            allowed = ttl + (stale_ttl if stale else 0.0)
            if made.start < r.start - allowed - slack:
                verdict.wrong.append(f"{r.key}: {v!r} produced {r.start - made.start:.3f} s before the read")
                continue
            last = None
            for w in durable.get(r.key, ()):
                if w.end < r.start - delay:
                    last = w
                else:
                    break
            if last is None or made.start >= last.start:
                continue
            own = set_by_seq.get(v["s"]) if made.kind == "set" else None
            if own is not None and own.start <= last.end and own.end >= last.start:
                continue  # concurrent writes: either may win
            verdict.superseded.append(
                f"{r.key}: {v!r} ({made.kind} at {made.start:.4f}) read at {r.start:.4f}, after a durable "
                f"{last.kind} (seq {last.seq}) of {last.start:.4f}-{last.end:.4f}"
            )
        return verdict


# --- figures ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def latency_figures(
    history: History, windows: Sequence[FaultWindow], margin: float = 0.2
) -> dict[str, float]:
    """p50/p99 (ms) of calls that started while a fault was active (+ ``margin`` s), and of the rest."""
    during: list[float] = []
    calm: list[float] = []
    for start, took in history.latencies:
        hit = any(w.started <= start <= w.ended + margin for w in windows)
        (during if hit else calm).append(took * 1000)
    return {
        "calls_during_faults": len(during),
        "p50_ms_during_faults": round(percentile(during, 0.5), 2),
        "p99_ms_during_faults": round(percentile(during, 0.99), 2),
        "max_ms_during_faults": round(max(during, default=0.0), 2),
        "p50_ms_calm": round(percentile(calm, 0.5), 2),
        "p99_ms_calm": round(percentile(calm, 0.99), 2),
        "mean_ms_all": round(statistics.fmean([t * 1000 for _, t in history.latencies] or [0.0]), 3),
    }


def report(name: str, figures: dict[str, Any]) -> None:
    """Print the figures; also write them to ``$TIERCACHE_FIGURES_DIR/<name>.json`` when set."""
    print(f"\n[{name}] " + json.dumps(figures, sort_keys=True))
    out = os.environ.get("TIERCACHE_FIGURES_DIR")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(figures, f, indent=2, sort_keys=True)
