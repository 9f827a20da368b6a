"""The state one cache's drivers share: its tier gateway, flights, coherence and background work."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ._bus import Bus
from ._coherence import Coherence
from ._engine import FillPlan, LoadOutcome
from ._entry import Entry
from ._events import Event, EventHook
from ._flight import FlightRegistry
from ._gateway import TierGateway
from ._policy import Policy
from ._serde import Codec
from ._stats import CacheStats
from ._tier import LeaseTier, TagStore, Tier

__all__ = ["Runtime"]

logger = logging.getLogger("tiercache")


def _offers_lease(tier: Tier) -> bool:
    return isinstance(tier, LeaseTier) and bool(tier.offers_lease)


class Runtime:
    """One TieredCache's shared state: ``gw`` (every tier call), the flight registry, coherence,
    the plan the engine walks, background threads and tasks, and the test hooks (bypass, trace)."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        clock: Callable[[], float],
        codec: Codec,
        hook: EventHook | None,
        breaker_threshold: int,
        breaker_cooldown: float,
        namespace: str = "tc",
        bus: Bus | None = None,
        tag_refresh: float = 1.0,
        auto_batch: bool = True,
    ) -> None:
        gw = self.gw = TierGateway(
            tiers,
            clock=clock,
            codec=codec,
            hook=hook,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            auto_batch=auto_batch,
        )
        self.tiers = gw.tiers
        self.names = gw.names
        self.clock = clock
        self.codec = codec
        self.stats: CacheStats = gw.stats
        self.l1 = gw.l1
        self.remote = gw.remote
        self.flights = FlightRegistry()
        self.threads: set[threading.Thread] = set()  # background refreshes of sync callers
        self.tasks: set[asyncio.Task[Any]] = set()  # background work of async callers
        self.closing = False  # set by aclose(): cancelled flights are abandoned, not taken over
        # tiercache.testing.bypass(): every read misses, every write is dropped, loaders run.
        self.bypass = False
        # Tests: a list the drivers append every command they execute to (driver parity).
        self.trace: list[Any] | None = None
        lease = next((i for i in self.remote if _offers_lease(self.tiers[i])), None)
        self.plan = FillPlan(
            names=self.names, remote=self.remote, lease=lease, write_order=gw.write_order, clock=clock
        )
        store = next((i for i in self.remote if isinstance(self.tiers[i], TagStore)), None)
        self.coherence = Coherence(
            namespace,
            bus,
            tag_refresh,
            clock=clock,
            flights=self.flights,
            l1=[(i, self.tiers[i]) for i in self.l1],
            tag_store=store,
            fetch_tag_times=gw.tag_times_sync,
            afetch_tag_times=gw.tag_times_async,
            emit=gw.emit,
            tier_failed=gw.tier_failed,
            expire_in_process=gw.expire_in_process,
            codec=codec,
            shared=[self.tiers[i] for i in self.remote],
        )
        gw.attach(self.coherence, self.flights.lock)

    # --- what others read of the gateway (events, hooks, key redaction) ---------------------

    @property
    def hook(self) -> EventHook | None:
        return self.gw.hook

    @property
    def closed(self) -> bool:
        """Set by aclose()/close(): shared tiers are not reopened behind the user's back."""
        return self.gw.closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self.gw.closed = value

    @property
    def redact_keys(self) -> bool:
        return self.gw.redact_keys

    @redact_keys.setter
    def redact_keys(self, value: bool) -> None:
        self.gw.redact_keys = value

    def add_hook(self, hook: EventHook) -> Callable[[], None]:
        return self.gw.add_hook(hook)

    def _emit_event(self, event: Event) -> None:
        self.gw._emit_event(event)

    def emit(
        self,
        kind: str,
        key: str,
        tier: int | None = None,
        duration: float | None = None,
        error: BaseException | None = None,
        source: str | None = None,
    ) -> None:
        self.gw.emit(kind, key, tier, duration, error, source)

    def log_key(self, key: str) -> str:
        return self.gw.log_key(key)

    def log_error(self, exc: BaseException | None, key: str) -> str:
        return self.gw.log_error(exc, key)

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a background task referenced until done, and collect its exception."""
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("background task failed: %r", task.exception())

    # --- entries --------------------------------------------------------------------------

    def build_entry(
        self, key: str, value: Any, policy: Policy, loaded: LoadOutcome, version: int
    ) -> Entry | None:
        ctx = loaded.context
        if ctx is not None:  # the loader had its say (adaptive caching)
            if not ctx.cache:
                return None
            policy = policy.with_overrides(ttl=ctx.ttl, stale_ttl=ctx.stale_ttl, tags=ctx.tags)
        now = self.clock()
        return policy.new_entry(
            key, value, now, created_at=loaded.started_at or now, version=version, delta=loaded.duration
        )
