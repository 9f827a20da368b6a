"""TieredCache: the public object, its async API and its sync mirror (``cache.sync``)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, TypeVar, overload

from . import _async, _sync
from ._bus import Bus
from ._checks import check_batch_loader, check_loader, check_tier_order
from ._engine import Outcome, Source
from ._errors import ConfigurationError
from ._events import EventHook
from ._keys import check_key
from ._policy import Policy
from ._runtime import Runtime
from ._serde import Codec, JsonCodec, converter_for, loader_type
from ._stats import CacheStats
from ._tier import InlineL1, Tier, TierBinding
from ._ttl import Duration

__all__ = ["Lookup", "SyncTieredCache", "TierCheck", "TieredCache"]

T = TypeVar("T")


class Lookup(NamedTuple):
    """A value and where it came from (see ``TieredCache.lookup``)."""

    value: Any
    source: str
    tier: str | None

    @classmethod
    def of(cls, outcome: Outcome) -> Lookup:
        """The lookup of a flow's outcome. A tier hit on a copy that fail-safe holds (a stale
        value kept fresh for the retry throttle) is reported as the fail-safe value it is."""
        entry = outcome.entry
        if entry is not None and entry.held and outcome.source[:1] == "L":
            return cls(outcome.value, Source.STALE_FAILSAFE, outcome.tier)
        return cls(outcome.value, outcome.source, outcome.tier)


_UNSET: Any = object()


class TierCheck(NamedTuple):
    """One tier's answer to ``cache.check()``: whether it answers, and if not, why not."""

    tier: str
    ok: bool
    reason: str | None = None  # why it does not answer (the address, redacted, and the error)
    breaker_open: bool = False  # the core is skipping it after repeated failures


_PROBE_KEY = "tiercache-health-check"  # read by check() on tiers that have no check method


class TieredCache:
    """A chain of tiers (fastest first) in front of your loaders.

    ``ttl`` seconds an entry is fresh; ``stale_ttl`` seconds after that it is kept for
    stale-while-revalidate (``swr=True``) and fail-safe (on by default: a failing loader is answered
    with the stale value). ``namespace`` prefixes every key (``namespace:key``), so caches sharing a
    Redis never see each other's keys. ``clock`` is a wall-clock function (inject a fake in tests).
    Per-call keyword arguments override these defaults. ``metrics=False`` makes the decorators'
    inline hit path only mark the entry visited instead of counting the hit (``cache.stats`` then
    under-counts L1 hits).
    ``bus`` (e.g. ``RedisBus``) tells other processes to drop their L1 copies on every ``set``,
    ``delete``, ``expire``, ``invalidate_tags`` and ``clear``; tag invalidation times are cached
    for ``tag_refresh`` seconds between reads of the shared tag store. ``auto_batch`` (on by
    default) coalesces concurrent async reads of a remote tier made in the same event-loop tick
    into one multi-key read (one MGET); turn it off to save a lone read its one loop turn.
    ``redact_keys`` logs a digest of each key instead of the key itself.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        ttl: Duration = 60.0,
        stale_ttl: Duration = 0.0,
        namespace: str = "tc",
        swr: bool = False,
        fail_safe: bool = True,
        fail_safe_throttle: Duration = 5.0,
        soft_timeout: Duration | None = None,
        hard_timeout: Duration | None = None,
        early_refresh_beta: float = 0.0,
        early_refresh_ratio: float = 0.0,
        jitter: float = 0.0,
        lease_ttl: Duration = 10.0,
        lease_wait: Duration = 5.0,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 1.0,
        clock: Callable[[], float] | None = None,
        codec: Codec | None = None,
        on_event: EventHook | None = None,
        metrics: bool = True,
        bus: Bus | None = None,
        tag_refresh: float = 1.0,
        auto_batch: bool = True,
        redact_keys: bool = False,
    ) -> None:
        tiers = list(tiers)
        if not tiers:
            raise ConfigurationError("a TieredCache needs at least one tier")
        for tier in tiers:
            if not isinstance(tier, Tier):
                raise ConfigurationError(f"{tier!r} does not implement the Tier protocol")
        if len({id(t) for t in tiers}) != len(tiers):
            raise ConfigurationError("the same tier object appears twice in the chain")
        check_tier_order(tiers)
        if not isinstance(namespace, str) or not namespace or ":" in namespace:
            raise ConfigurationError("namespace must be a non-empty str without ':'")
        if breaker_threshold < 1 or breaker_cooldown < 0:
            raise ConfigurationError("breaker_threshold must be >= 1 and breaker_cooldown >= 0")
        self.namespace = namespace
        self._prefix = namespace + ":"
        self._typed_policies: dict[Any, Policy] = {}
        self.clock: Callable[[], float] = clock if clock is not None else time.time
        self.policy = Policy.build(
            ttl=ttl,
            stale_ttl=stale_ttl,
            swr=swr,
            fail_safe=fail_safe,
            fail_safe_throttle=fail_safe_throttle,
            soft_timeout=soft_timeout,
            hard_timeout=hard_timeout,
            early_refresh_beta=early_refresh_beta,
            early_refresh_ratio=early_refresh_ratio,
            jitter=jitter,
            lease_ttl=lease_ttl,
            lease_wait=lease_wait,
        )
        self._rt = Runtime(
            tiers,
            clock=self.clock,
            codec=codec if codec is not None else JsonCodec(),
            hook=on_event,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            namespace=namespace,
            bus=bus,
            tag_refresh=tag_refresh,
            auto_batch=auto_batch,
        )
        self._tags_ok = self._rt.coherence.tags_valid_locally
        self._rt.redact_keys = redact_keys
        binding = TierBinding(
            clock=self.clock,
            codec=self._rt.codec,
            namespace=namespace,
            on_event=self._rt._emit_event,
            redact_keys=redact_keys,
        )
        _claim_tiers(self, tiers)
        for tier in tiers:
            tier.bind(binding)
        self._metrics = metrics
        # The first tier's slot lookup, when it offers one (MemoryTier): hits skip the drivers.
        # Only valid keys are ever stored, so a hit needs no key check. Early refresh needs the
        # driver on every hit, so it turns the inline path off.
        first = tiers[0]
        self._lookup: Callable[[str], Any] | None = (
            first.fast_lookup
            if isinstance(first, InlineL1) and self._rt.l1 and not self.policy.early_refresh
            else None
        )
        self.sync = SyncTieredCache(self)

    def __repr__(self) -> str:
        return f"TieredCache({list(self._rt.tiers)!r}, namespace={self.namespace!r}, ttl={self.policy.ttl})"

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return self._rt.tiers

    def add_event_hook(self, hook: EventHook) -> Callable[[], None]:
        """Also send every event to ``hook`` (after ``on_event`` and earlier hooks); returns a
        function that removes it. A hook that raises is logged and never breaks a request."""
        return self._rt.add_hook(hook)

    @property
    def stats(self) -> CacheStats:
        """Counters per tier and per cache (see ``CacheStats``)."""
        return self._rt.stats

    # --- helpers shared with the sync mirror and the decorator ------------------------------

    def full_key(self, key: str) -> str:
        """The key as tiers see it: ``namespace:key`` (after validating ``key``)."""
        return self._prefix + check_key(key)

    def policy_for(
        self,
        *,
        ttl: Duration | None = None,
        stale_ttl: Duration | None = None,
        tags: Iterable[str] | None = None,
        value_type: Any = _UNSET,
        **options: Any,
    ) -> Policy:
        """The default policy with per-call overrides (None keeps the default)."""
        if (
            ttl is None
            and stale_ttl is None
            and tags is None
            and value_type is _UNSET
            and (not options or all(v is None for v in options.values()))
        ):
            return self.policy
        if ttl is None and stale_ttl is None and tags is None and not options:
            if value_type is None:
                return self.policy
            typed = self._typed_policies.get(value_type)  # value_type alone: once per type
            if typed is None:
                typed = self.policy.with_overrides(converter=converter_for(value_type))
                if len(self._typed_policies) < 1024:
                    self._typed_policies[value_type] = typed
            return typed
        conv = None if value_type is _UNSET or value_type is None else converter_for(value_type)
        tag_tuple = None if tags is None else _check_tags(tags)
        return self.policy.with_overrides(
            ttl=ttl, stale_ttl=stale_ttl, tags=tag_tuple, converter=conv, **options
        )

    # --- async API --------------------------------------------------------------------------

    @overload
    async def get_cached(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        *,
        ttl: Duration | None = ...,
        stale_ttl: Duration | None = ...,
        tags: Iterable[str] | None = ...,
        value_type: Any = ...,
        **options: Any,
    ) -> T: ...

    @overload
    async def get_cached(
        self,
        key: str,
        loader: Callable[[], T],
        *,
        ttl: Duration | None = ...,
        stale_ttl: Duration | None = ...,
        tags: Iterable[str] | None = ...,
        value_type: Any = ...,
        **options: Any,
    ) -> T: ...

    async def get_cached(
        self,
        key: str,
        loader: Callable[[], Any],
        *,
        ttl: Duration | None = None,
        stale_ttl: Duration | None = None,
        tags: Iterable[str] | None = None,
        value_type: Any = _UNSET,
        **options: Any,
    ) -> Any:
        """The value for ``key``: from the first tier holding it fresh, else from ``loader()``
        (sync or async, no arguments), called once per key however many callers are waiting.

        ``options``: swr, fail_safe, fail_safe_throttle, soft_timeout, hard_timeout, jitter,
        early_refresh_beta, early_refresh_ratio, lease_ttl, lease_wait.
        """
        lookup = self._lookup
        if lookup is not None and type(key) is str and not options:  # inline L1 hit
            slot = lookup(self._prefix + key)
            if (
                slot is not None
                and slot.entry.fresh_until > self.clock()
                and (not slot.entry.tags or self._tags_ok(slot.entry) is True)
            ):
                slot.visited = slot.visited.next
                return slot.entry.value
        if value_type is _UNSET:
            value_type = loader_type(loader) or _UNSET  # the loader's return annotation
        if ttl is None and stale_ttl is None and tags is None and value_type is _UNSET and not options:
            policy = self.policy
        else:
            policy = self.policy_for(
                ttl=ttl, stale_ttl=stale_ttl, tags=tags, value_type=value_type, **options
            )
        check_loader(loader)
        return (await _async.get_cached(self._rt, self._prefix + check_key(key), loader, policy)).value

    async def lookup(
        self,
        key: str,
        loader: Callable[[], Any],
        *,
        ttl: Duration | None = None,
        stale_ttl: Duration | None = None,
        tags: Iterable[str] | None = None,
        value_type: Any = _UNSET,
        **options: Any,
    ) -> Lookup:
        """``get_cached`` that also says where the value came from (for debugging and tests):
        ``Lookup(value, source, tier)`` with source "L1", "L2"... (a tier hit; ``tier`` is its
        name), "LOADED", "JOINED", "STALE_SWR" or "STALE_FAILSAFE"."""
        if value_type is _UNSET:
            value_type = loader_type(loader) or _UNSET
        policy = self.policy_for(ttl=ttl, stale_ttl=stale_ttl, tags=tags, value_type=value_type, **options)
        check_loader(loader)
        outcome = await _async.get_cached(self._rt, self.full_key(key), loader, policy)
        return Lookup.of(outcome)

    async def get_many_cached(
        self,
        keys: Iterable[str],
        load_many: Callable[[list[str]], Mapping[str, T] | Awaitable[Mapping[str, T]]],
        *,
        ttl: Duration | None = None,
        stale_ttl: Duration | None = None,
        tags: Iterable[str] | None = None,
        value_type: Any = _UNSET,
        **options: Any,
    ) -> dict[str, T]:
        """Values for many keys at once: one L1 pass, one multi-key read per lower tier (one MGET
        on Redis), then **one** call of ``load_many(missing_keys)`` (sync or async, returning a
        mapping) for what is still missing. Keys other callers are already loading are joined.
        Keys the loader does not return are left out of the result (misses, not errors). If the
        loader raises, keys with a stale value are served it (fail-safe) and the error is raised
        only if some key got nothing.
        """
        policy = self.policy_for(ttl=ttl, stale_ttl=stale_ttl, tags=tags, value_type=value_type, **options)
        full = self._full_keys(keys)
        outcomes = await _async.get_many_cached(self._rt, list(full), self._batch_loader(load_many), policy)
        return {full[k]: o.value for k, o in outcomes.items()}

    def _full_keys(self, keys: Iterable[str]) -> dict[str, str]:
        """full key -> the caller's key, in order, duplicates folded."""
        if isinstance(keys, str):
            raise ConfigurationError("get_many_cached takes an iterable of keys, not one string")
        return {self.full_key(k): k for k in keys}

    def _batch_loader(self, load_many: Callable[[list[str]], Any]) -> Callable[[Sequence[str]], Any]:
        """Adapt the caller's loader (its own keys) to the driver's (full keys), sync or async."""
        check_batch_loader(load_many)
        cut = len(self._prefix)
        prefix = self._prefix

        def rekey(values: Any) -> dict[str, Any]:
            if not isinstance(values, Mapping):
                raise TypeError(f"load_many must return a mapping, not {type(values).__qualname__}")
            return {prefix + k: v for k, v in values.items()}

        def call(full_keys: Sequence[str]) -> Any:
            result = load_many([k[cut:] for k in full_keys])
            if inspect.isawaitable(result):

                async def rekeyed() -> dict[str, Any]:
                    return rekey(await result)

                return rekeyed()
            return rekey(result)

        return call

    async def get(
        self, key: str, default: Any = None, *, value_type: Any = None, allow_stale: bool = False
    ) -> Any:
        """The cached value for ``key`` or ``default``; never calls a loader."""
        conv = None if value_type is None else converter_for(value_type)
        return await _async.get(self._rt, self.full_key(key), default, conv, allow_stale)

    async def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: Duration | None = None,
        stale_ttl: Duration | None = None,
        tags: Iterable[str] | None = None,
        value_type: Any = _UNSET,
    ) -> None:
        """Store ``value`` in every tier. Raises SerializationError (a TypeError) before touching
        any tier if a remote tier cannot hold the value, ValueTooLargeError if no tier takes it.
        ``value_type`` declares the value's type (needed for dataclasses and pydantic models)."""
        policy = self.policy_for(ttl=ttl, stale_ttl=stale_ttl, tags=tags, value_type=value_type)
        await _async.set_value(self._rt, self.full_key(key), value, policy)

    async def delete(self, key: str) -> None:
        """Remove ``key`` from every tier and from other processes' L1 (through the bus); a load
        of it already running will not store its result."""
        await _async.delete(self._rt, self.full_key(key))

    async def expire(self, key: str) -> None:
        """Mark ``key`` stale in every tier (and other processes' L1): the next ``get_cached``
        reloads it, and until then it stays available for fail-safe and SWR."""
        await _async.expire(self._rt, self.full_key(key))

    async def invalidate_tags(self, *tags: str) -> None:
        """Invalidate every entry carrying any of ``tags`` (created at or before now), in O(1):
        one write of the tags' times to the shared tag store, one bus message."""
        await _async.invalidate_tags(self._rt, _check_tags(tags))

    async def clear(self) -> None:
        """Remove every key of this namespace from every tier (never anything outside it) and
        tell other processes to clear their L1 for it."""
        await _async.clear(self._rt)

    async def check(self) -> list[TierCheck]:
        """Ask every tier whether it answers now (a PING on Redis), in chain order. A tier without
        a ``check``/``acheck`` method answers if a read of a probe key does not fail."""
        gw, probe_key = self._rt.gw, self.full_key(_PROBE_KEY)
        out = []
        for i, name in enumerate(gw.names):
            reason, breaker_open = await gw.check_async(i, probe_key)
            out.append(TierCheck(name, reason is None, reason, breaker_open))
        return out

    async def aclose(self, grace: float = 1.0) -> None:
        """Finish background work (waiting up to ``grace`` seconds, then cancelling) and close
        the tiers. Using the cache afterwards raises CacheClosedError (a shared tier would otherwise
        quietly reconnect)."""
        loop = asyncio.get_running_loop()
        mine = [t for t in self._rt.tasks if t.get_loop() is loop and not t.done()]
        if mine:
            _, pending = await asyncio.wait(mine, timeout=grace)
            if pending:
                self._rt.closing = True
                try:
                    for task in pending:
                        task.cancel()
                    await asyncio.wait(pending, timeout=grace)
                finally:
                    self._rt.closing = False
        if self._rt.coherence._started:
            await asyncio.to_thread(self._rt.coherence.stop)  # heartbeat off, goodbye sent
        self._rt.closed = True
        for tier in self._rt.tiers:
            await tier.aclose()
        bus = self._rt.coherence.bus
        if bus is not None and self._rt.coherence._started:
            await bus.aclose()

    async def __aenter__(self) -> TieredCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# Each tier object serves one cache: binding sets its codec, clock, event hook and namespace, so
# a second cache would silently take them over (a signed cache would then accept unsigned values).
# The exception: an in-process tier (it uses no codec or namespace) shared by caches on one clock.
_tier_owners: weakref.WeakKeyDictionary[Any, tuple[weakref.ReferenceType[TieredCache], Any]] = (
    weakref.WeakKeyDictionary()
)
_owners_lock = threading.Lock()


def _claim_tiers(cache: TieredCache, tiers: Sequence[Any]) -> None:
    """Record ``cache`` as the owner of each tier; ConfigurationError if one already has a live owner."""
    with _owners_lock:
        seen: set[int] = set()
        for tier in tiers:
            if id(tier) in seen:
                raise ConfigurationError(f"tier {tier!r} appears twice in one cache")
            seen.add(id(tier))
            try:
                owner, clock = _tier_owners.get(tier, (None, None))
            except TypeError:  # neither hashable nor weakly referenceable: cannot be tracked
                continue
            if owner is None or owner() is None:
                continue
            if getattr(tier, "in_process", False) and clock is cache.clock:
                continue
            raise ConfigurationError(
                f"tier {tier!r} already belongs to another TieredCache, which set its codec, clock "
                "and namespace; create one tier object per cache (they may share a server)"
            )
        for tier in tiers:
            with contextlib.suppress(TypeError):
                known = _tier_owners.get(tier)
                if known is None or known[0]() is None:
                    _tier_owners[tier] = (weakref.ref(cache), cache.clock)


class SyncTieredCache:
    """The blocking mirror of a TieredCache's API (``cache.sync``), sharing its tiers and flights.

    For threads and sync programs. Loaders must be plain functions here. Calling it from inside a
    running event loop blocks that loop for the duration of the call (as any blocking call does).
    """

    def __init__(self, cache: TieredCache) -> None:
        self._cache = cache
        self._rt = cache._rt

    def get_cached(
        self,
        key: str,
        loader: Callable[[], T],
        *,
        ttl: Duration | None = None,
        stale_ttl: Duration | None = None,
        tags: Iterable[str] | None = None,
        value_type: Any = _UNSET,
        **options: Any,
    ) -> T:
        """As ``TieredCache.get_cached``, blocking; ``loader`` must not be a coroutine function."""
        cache = self._cache
        lookup = cache._lookup
        if lookup is not None and type(key) is str and not options:  # inline L1 hit
            slot = lookup(cache._prefix + key)
            if (
                slot is not None
                and slot.entry.fresh_until > cache.clock()
                and (not slot.entry.tags or cache._tags_ok(slot.entry) is True)
            ):
                slot.visited = slot.visited.next
                hit: T = slot.entry.value
                return hit
        if value_type is _UNSET:
            value_type = loader_type(loader) or _UNSET  # the loader's return annotation
        policy = cache.policy_for(ttl=ttl, stale_ttl=stale_ttl, tags=tags, value_type=value_type, **options)
        check_loader(loader)
        value: T = _sync.get_cached(self._rt, cache.full_key(key), loader, policy).value
        return value

    def lookup(
        self,
        key: str,
        loader: Callable[[], Any],
        *,
        ttl: Duration | None = None,
        stale_ttl: Duration | None = None,
        tags: Iterable[str] | None = None,
        value_type: Any = _UNSET,
        **options: Any,
    ) -> Lookup:
        """As ``TieredCache.lookup``, blocking."""
        cache = self._cache
        if value_type is _UNSET:
            value_type = loader_type(loader) or _UNSET
        policy = cache.policy_for(ttl=ttl, stale_ttl=stale_ttl, tags=tags, value_type=value_type, **options)
        check_loader(loader)
        outcome = _sync.get_cached(self._rt, cache.full_key(key), loader, policy)
        return Lookup.of(outcome)

    def get_many_cached(
        self,
        keys: Iterable[str],
        load_many: Callable[[list[str]], Mapping[str, T]],
        *,
        ttl: Duration | None = None,
        stale_ttl: Duration | None = None,
        tags: Iterable[str] | None = None,
        value_type: Any = _UNSET,
        **options: Any,
    ) -> dict[str, T]:
        """As ``TieredCache.get_many_cached``, blocking; ``load_many`` must be a plain function."""
        cache = self._cache
        policy = cache.policy_for(ttl=ttl, stale_ttl=stale_ttl, tags=tags, value_type=value_type, **options)
        full = cache._full_keys(keys)
        outcomes = _sync.get_many_cached(self._rt, list(full), cache._batch_loader(load_many), policy)
        return {full[k]: o.value for k, o in outcomes.items()}

    def get(self, key: str, default: Any = None, *, value_type: Any = None, allow_stale: bool = False) -> Any:
        conv = None if value_type is None else converter_for(value_type)
        return _sync.get(self._rt, self._cache.full_key(key), default, conv, allow_stale)

    def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: Duration | None = None,
        stale_ttl: Duration | None = None,
        tags: Iterable[str] | None = None,
        value_type: Any = _UNSET,
    ) -> None:
        policy = self._cache.policy_for(ttl=ttl, stale_ttl=stale_ttl, tags=tags, value_type=value_type)
        _sync.set_value(self._rt, self._cache.full_key(key), value, policy)

    def delete(self, key: str) -> None:
        _sync.delete(self._rt, self._cache.full_key(key))

    def expire(self, key: str) -> None:
        _sync.expire(self._rt, self._cache.full_key(key))

    def invalidate_tags(self, *tags: str) -> None:
        _sync.invalidate_tags(self._rt, _check_tags(tags))

    def clear(self) -> None:
        _sync.clear(self._rt)

    def check(self) -> list[TierCheck]:
        """``TieredCache.check`` for sync callers."""
        gw, probe_key = self._cache._rt.gw, self._cache.full_key(_PROBE_KEY)
        out = []
        for i, name in enumerate(gw.names):
            reason, breaker_open = gw.check_sync(i, probe_key)
            out.append(TierCheck(name, reason is None, reason, breaker_open))
        return out

    def close(self, grace: float = 1.0) -> None:
        """Wait up to ``grace`` seconds for background refresh threads, then close the tiers."""
        deadline = time.monotonic() + grace
        for thread in list(self._rt.threads):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if self._rt.coherence._started:
            self._rt.coherence.stop()  # heartbeat off, goodbye sent
        self._rt.closed = True
        for tier in self._rt.tiers:
            tier.close()
        bus = self._rt.coherence.bus
        if bus is not None and self._rt.coherence._started:
            bus.close()

    def __enter__(self) -> SyncTieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise ConfigurationError("tags must be an iterable of strings, not one string")
    out = tuple(tags)
    for tag in out:
        if not isinstance(tag, str) or not tag:
            raise ConfigurationError(f"tags must be non-empty strings, not {tag!r}")
    # A str subclass (a StrEnum member...) becomes its plain text, as keys do.
    return tuple(t if type(t) is str else str.__str__(t) for t in out)
