"""Django cache backend: Django's cache API over a TieredCache (memory -> Redis, bus on), signed pickles.

Use it in ``CACHES``::

    CACHES = {
        "default": {
            "BACKEND": "tiercache.contrib.django.TieredCacheBackend",
            "LOCATION": "redis://127.0.0.1:6379/0",
            "OPTIONS": {"NAMESPACE": "myapp", "L1_MAX_ENTRIES": 10_000},
        }
    }

How values are stored
=====================
Django caches arbitrary Python objects, so values are pickled (``PICKLE_PROTOCOL``). The pickle
bytes are the entry's value; the cache's codec is ``tiercache.signing.SignedCodec`` with a key
derived from ``SECRET_KEY`` (``SECRET_KEY_FALLBACKS`` still verify; ``SIGNING_KEYS`` overrides
both), so Redis only ever holds HMAC-signed records and nothing is unpickled before its signature
verified. A record that was tampered with, or signed with an unknown key, reads as a miss. L1 holds
the pickle bytes too: every ``get`` returns a fresh copy, as Django's own backends do.

Keys and timeouts
=================
Django builds the key (``KEY_PREFIX``, ``VERSION``, ``KEY_FUNCTION``; the usual
``CacheKeyWarning`` checks); it is stored as ``<NAMESPACE>:<key>``. ``timeout=None`` keeps a value
"forever" (``FOREVER`` seconds, a century); ``0`` or less means "expire now": ``set`` deletes the
key, ``add`` reports success without storing, ``touch`` deletes it.

Atomicity
=========
``set``, ``delete`` and ``clear`` are tiercache's own (last writer wins, by version; other
processes' L1 copies are dropped through the bus). ``add``, ``incr``, ``decr`` and ``touch`` are
read-modify-write operations made atomic across processes by a compare-and-set on Redis
(``tiercache.adapters.redis.compare_and_set``): the new record is written only if the stored one is
still the one read, else the operation reads again. So ``add`` succeeds for exactly one caller,
and no increment is lost, whatever the number of processes, also against concurrent ``set`` and
``delete`` (they are linearizable on the Redis record). These four operations need Redis: when
it cannot be reached they raise ``tiercache.TierError`` (``add`` never claims success it did not
get). ``get_or_set`` is tiercache's ``get_cached``: the default is computed once per key across
threads and processes (single flight, Redis lease). ``incr_version``/``decr_version`` are Django's.

One ``TieredCache`` per process and configuration is shared by every thread's backend object
(Django makes one per thread and per async context), so there is one L1 and one bus subscription.
``close()`` (called by Django after every request) keeps the connections open.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import pickle
import random
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.core.exceptions import ImproperlyConfigured, SynchronousOnlyOperation

from tiercache._cache import TieredCache
from tiercache._entry import Entry, next_version
from tiercache._errors import TierError
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import (
    RedisBus,
    RedisTier,
    acompare_and_set,
    aread_for_update,
    compare_and_set,
    read_for_update,
)
from tiercache.signing import MIN_KEY_BYTES, SignedCodec

__all__ = ["FOREVER", "TieredCacheBackend"]

logger = logging.getLogger("tiercache")

FOREVER = 100 * 365.25 * 86400.0  # seconds: what timeout=None stores a value for
_MAX_KEY = 4000  # longer Django keys are stored under a digest (tiercache refuses keys > 8192)
_CAS_ATTEMPTS = 100  # compare-and-set retries before an add/incr gives up (heavy contention)
_KEY_LABEL = b"tiercache.contrib.django signing key v1"
_MISS: Any = object()

_OPTIONS = {
    "NAMESPACE": "prefix of every key in Redis (no ':'); clear() removes only this namespace",
    "L1_MAX_ENTRIES": "entries kept in each process's memory tier (default 10000)",
    "L1_MAX_BYTES": "bytes kept in each process's memory tier (default: unbounded)",
    "L1_MAX_TTL": "longest time a value stays in a memory tier (default: its own timeout)",
    "BUS": "publish/receive invalidations so other processes drop their L1 copies (default True)",
    "SIGNING_KEYS": "keys for the signed codec, first signs (default: derived from SECRET_KEY)",
    "PICKLE_PROTOCOL": "pickle protocol for values (default pickle.HIGHEST_PROTOCOL)",
    "REDIS": "extra RedisTier keyword arguments, e.g. {'socket_timeout': 1.0}",
    "CACHE": "extra TieredCache keyword arguments, e.g. {'breaker_cooldown': 2.0}",
}


def _pause(attempt: int) -> float:
    """A jittered pause after a lost compare-and-set race (0 to 0.1 ms, growing to 0 to 5 ms)."""
    return random.uniform(0.0, 0.0001 * min(2**attempt, 50))


def _derive(secret: str | bytes) -> bytes:
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    return hmac.new(raw, _KEY_LABEL, hashlib.sha256).digest()


def _signing_keys(option: Any) -> list[bytes]:
    if option is not None:
        if isinstance(option, (str, bytes)) or not isinstance(option, Iterable):
            raise ImproperlyConfigured("OPTIONS['SIGNING_KEYS'] must be a list of keys")
        keys = [k.encode("utf-8") if isinstance(k, str) else k for k in option]
        if not keys or any(not isinstance(k, bytes) or len(k) < MIN_KEY_BYTES for k in keys):
            raise ImproperlyConfigured(
                f"OPTIONS['SIGNING_KEYS'] needs keys of at least {MIN_KEY_BYTES} bytes"
            )
        return keys
    secret = getattr(settings, "SECRET_KEY", "")
    if not secret:
        raise ImproperlyConfigured("the Django cache backend signs values with SECRET_KEY; set it")
    fallbacks = list(getattr(settings, "SECRET_KEY_FALLBACKS", ()) or ())
    return [_derive(secret)] + [_derive(s) for s in fallbacks if s]


class _Shared:
    """The TieredCache and its Redis tier for one configuration in one process."""

    def __init__(self, location: str, options: Mapping[str, Any], keys: list[bytes]) -> None:
        redis_kwargs = {"socket_timeout": 0.5, "connect_timeout": 0.5, **options.get("REDIS", {})}
        self.redis = RedisTier(url=location, **redis_kwargs)
        l1 = MemoryTier(
            int(options.get("L1_MAX_ENTRIES", 10_000)),
            max_bytes=options.get("L1_MAX_BYTES"),
            max_ttl=options.get("L1_MAX_TTL"),
        )
        bus = RedisBus.for_tier(self.redis) if options.get("BUS", True) else None
        self.cache = TieredCache(
            [l1, self.redis],
            namespace=options.get("NAMESPACE", "django"),
            codec=SignedCodec(keys, pickle=True),
            bus=bus,
            **options.get("CACHE", {}),
        )
        self.coherence = self.cache._rt.coherence

    # --- compare-and-set operations (see the module docstring) -------------------------------

    def _entry(self, fk: str, blob: bytes, now: float, ttl: float, after: Entry | None) -> Entry:
        # The new record must outrank the one it replaces even if that one came from a process
        # whose clock runs ahead: L1 copies are dropped by version.
        version = next_version() if after is None else max(next_version(), after.version + 1)
        until = now + ttl
        return Entry(fk, blob, created_at=now, fresh_until=until, stale_until=until, version=version)

    def _announced(self, fk: str, entry: Entry) -> None:
        # What the core does after a set: drop older L1 copies here, then tell other processes.
        self.coherence.invalidate_locally(fk, entry.version, "set")
        self.coherence.publish_sync("set", (fk,), (), entry.version, entry.created_at)

    async def _aannounced(self, fk: str, entry: Entry) -> None:
        self.coherence.invalidate_locally(fk, entry.version, "set")
        await self.coherence.publish_async("set", (fk,), (), entry.version, entry.created_at)

    def _failed(self, op: str, exc: Exception) -> TierError:
        return TierError(self.redis.name, f"the Django backend's {op} needs Redis ({type(exc).__name__})")

    def adder(self, blob: bytes, ttl: float) -> Any:
        """The change that ``add`` makes: store ``blob`` unless a fresh value is there."""

        def change(fk: str, old: Entry | None, now: float) -> tuple[Entry | None, bool]:
            if old is not None and old.is_fresh(now):
                return None, False
            if ttl <= 0:
                return None, True  # Django: added, and expired at once (nothing to store)
            return self._entry(fk, blob, now, ttl, old), True

        return change

    def update(self, op: str, k: str, change: Any) -> Any:
        """Read-modify-write ``k``: ``change(full key, entry or None, now)`` returns (new entry
        or None, result); None means: write nothing, return ``result``. Exceptions from
        ``change`` propagate; Redis failures become TierError and are never retried."""
        fk = self.cache.full_key(k)
        for attempt in range(_CAS_ATTEMPTS):
            try:
                old, token = read_for_update(self.redis, fk)
            except Exception as exc:
                raise self._failed(op, exc) from exc
            new, result = change(fk, old, self.cache.clock())
            if new is None:
                return result
            try:
                written = compare_and_set(self.redis, fk, token, new)
            except Exception as exc:
                self._announced(fk, new)  # it may have been written: L1 copies must go anyway
                raise self._failed(op, exc) from exc
            if written:
                self._announced(fk, new)
                return result
            time.sleep(_pause(attempt))
        raise TierError(self.redis.name, f"{op} of {k!r} lost {_CAS_ATTEMPTS} races in a row")

    async def aupdate(self, op: str, k: str, change: Any) -> Any:
        fk = self.cache.full_key(k)
        for attempt in range(_CAS_ATTEMPTS):
            try:
                old, token = await aread_for_update(self.redis, fk)
            except Exception as exc:
                raise self._failed(op, exc) from exc
            new, result = change(fk, old, self.cache.clock())
            if new is None:
                return result
            try:
                written = await acompare_and_set(self.redis, fk, token, new)
            except Exception as exc:
                await self._aannounced(fk, new)
                raise self._failed(op, exc) from exc
            if written:
                await self._aannounced(fk, new)
                return result
            await asyncio.sleep(_pause(attempt))
        raise TierError(self.redis.name, f"{op} of {k!r} lost {_CAS_ATTEMPTS} races in a row")


_shared: dict[tuple[Any, ...], _Shared] = {}
_shared_lock = threading.Lock()


def _load_nothing(keys: list[str]) -> dict[str, Any]:
    return {}


class TieredCacheBackend(BaseCache):  # type: ignore[misc]  # django ships no type hints
    """A Django cache backend (``CACHES[...]["BACKEND"]``) over a TieredCache. See the module doc."""

    def __init__(self, location: str | list[str] | None, params: dict[str, Any]) -> None:
        super().__init__(params)
        options = dict(params.get("OPTIONS") or {})
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            known = "; ".join(f"{k}: {v}" for k, v in _OPTIONS.items())
            raise ImproperlyConfigured(
                f"unknown OPTIONS {unknown} for TieredCacheBackend (known: {known}). "
                "Redis evicts by its own maxmemory policy: MAX_ENTRIES/CULL_FREQUENCY do not apply."
            )
        if isinstance(location, (list, tuple)):
            if len(location) != 1:
                raise ImproperlyConfigured("LOCATION is one Redis URL")
            location = location[0]
        if not location or not isinstance(location, str):
            raise ImproperlyConfigured("LOCATION must be a Redis URL, e.g. redis://127.0.0.1:6379/0")
        namespace = options.get("NAMESPACE", "django")
        if not isinstance(namespace, str) or not namespace or ":" in namespace:
            raise ImproperlyConfigured("OPTIONS['NAMESPACE'] must be a non-empty str without ':'")
        self._location = location
        self._options = options
        self._protocol = int(options.get("PICKLE_PROTOCOL", pickle.HIGHEST_PROTOCOL))
        # Bad settings fail here, when Django first builds the cache, not on a request.
        self._s = self._shared_state()

    # --- plumbing -------------------------------------------------------------------------

    def _shared_state(self) -> _Shared:
        """This configuration's _Shared, built on first use in the process. (A forked child may
        keep its parent's: redis-py's pools, the tier's subscriber and the bus restart in the
        child, and the bus clears the L1 the child inherited.)"""
        keys = _signing_keys(self._options.get("SIGNING_KEYS"))
        ident = (self._location, repr(sorted(self._options.items())), hashlib.sha256(b"".join(keys)).digest())
        with _shared_lock:
            state = _shared.get(ident)
            if state is None:
                try:  # builds objects only: no connection is made before the first call
                    state = _Shared(self._location, self._options, keys)
                except (TypeError, ValueError) as exc:
                    raise ImproperlyConfigured(f"bad CACHES OPTIONS/LOCATION: {exc}") from exc
                _shared[ident] = state
            return state

    @property
    def tiered(self) -> TieredCache:
        """The TieredCache underneath (for ``stats``, events, ``lookup``...)."""
        return self._s.cache

    def get_backend_timeout(self, timeout: Any = DEFAULT_TIMEOUT) -> float | None:
        """Seconds to keep a value: None (forever), 0 (expire now) or a positive number."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return None
        return max(0.0, float(timeout))

    def _ttl(self, timeout: Any) -> float:
        ttl = self.get_backend_timeout(timeout)
        return FOREVER if ttl is None else ttl

    def _key(self, key: Any, version: int | None) -> str:
        k: str = self.make_and_validate_key(key, version=version)
        if len(k) > _MAX_KEY:
            k = "#sha256:" + hashlib.sha256(k.encode("utf-8", "surrogatepass")).hexdigest()
        return k

    def _dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, self._protocol)  # PickleError/TypeError reach the caller

    async def _adumps(self, value: Any) -> bytes:
        try:
            return self._dumps(value)
        except SynchronousOnlyOperation:
            # Pickling needs the database (an unevaluated QuerySet): do it where Django's own
            # async methods would, in its sync thread. Nothing was queried before the refusal.
            from asgiref.sync import sync_to_async

            blob: bytes = await sync_to_async(self._dumps)(value)
            return blob

    def _loads(self, blob: Any, default: Any) -> Any:
        try:
            return pickle.loads(blob)  # the bytes passed the signature check on their way in
        except Exception as exc:  # e.g. a class that no longer exists: a miss, never a crash
            logger.warning("cached value could not be unpickled (%s); treated as a miss", exc)
            return default

    def _bump(self, key: Any, delta: int) -> Any:
        def change(fk: str, old: Entry | None, now: float) -> tuple[Entry | None, Any]:
            if old is None or not old.is_fresh(now):
                raise ValueError(f"Key '{key}' not found")
            value = pickle.loads(old.value) + delta  # TypeError for non-numbers, as Django's
            new = old.replace(
                value=self._dumps(value), created_at=now, version=max(next_version(), old.version + 1)
            )
            return new, value

        return change

    def _toucher(self, ttl: float) -> Any:
        def change(fk: str, old: Entry | None, now: float) -> tuple[Entry | None, bool]:
            if old is None or not old.is_fresh(now):
                return None, False
            until = now + ttl
            new = old.replace(
                created_at=now,
                fresh_until=until,
                stale_until=until,
                version=max(next_version(), old.version + 1),
            )
            return new, True

        return change

    # --- the sync API ---------------------------------------------------------------------

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        blob = self._s.cache.sync.get(self._key(key, version), _MISS)
        return default if blob is _MISS else self._loads(blob, default)

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        k, blob, ttl = self._key(key, version), self._dumps(value), self._ttl(timeout)
        if ttl <= 0:
            self._s.cache.sync.delete(k)
        else:
            self._s.cache.sync.set(k, blob, ttl=ttl)

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        k, blob, ttl = self._key(key, version), self._dumps(value), self._ttl(timeout)
        return bool(self._s.update("add", k, self._s.adder(blob, ttl)))

    def get_or_set(
        self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        """The cached value, or ``default`` (called if callable) stored and returned: once per key
        across threads and processes (tiercache's single flight and Redis lease), not once per
        caller as in Django's get-add-get."""
        k, ttl = self._key(key, version), self._ttl(timeout)
        if ttl <= 0:  # nothing may be stored: Django's get, then the default
            blob = self._s.cache.sync.get(k, _MISS)
            if blob is not _MISS:
                return self._loads(blob, None)
            return default() if callable(default) else default

        def load() -> bytes:
            return self._dumps(default() if callable(default) else default)

        return self._loads(self._s.cache.sync.get_cached(k, load, ttl=ttl), None)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        k, ttl = self._key(key, version), self._ttl(timeout)
        if ttl <= 0:
            return self.delete(key, version=version)
        result: bool = self._s.update("touch", k, self._toucher(ttl))
        return result

    def delete(self, key: Any, version: int | None = None) -> bool:
        k = self._key(key, version)
        state = self._s
        try:
            old, _ = read_for_update(state.redis, state.cache.full_key(k))
            existed = old is not None and old.is_fresh(state.cache.clock())
        except Exception:  # Redis is down: answer from what this process can see
            existed = state.cache.sync.get(k, _MISS) is not _MISS
        state.cache.sync.delete(k)
        return existed

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self._s.cache.sync.get(self._key(key, version), _MISS) is not _MISS

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return self._s.update("incr", self._key(key, version), self._bump(key, delta))

    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return self._s.update("decr", self._key(key, version), self._bump(key, -delta))

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        names = {self._key(key, version): key for key in keys}
        if not names:
            return {}
        found = self._s.cache.sync.get_many_cached(list(names), _load_nothing)
        out = {}
        for k, blob in found.items():
            value = self._loads(blob, _MISS)
            if value is not _MISS:
                out[names[k]] = value
        return out

    def set_many(
        self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        for key, value in data.items():
            self.set(key, value, timeout, version=version)
        return []

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        cache = self._s.cache.sync
        for key in keys:
            cache.delete(self._key(key, version))

    def clear(self) -> None:
        self._s.cache.sync.clear()

    def close(self, **kwargs: Any) -> None:
        """Django calls this after every request: the shared connections stay open."""

    # --- the async API (native: no thread hops) -------------------------------------------

    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        blob = await self._s.cache.get(self._key(key, version), _MISS)
        return default if blob is _MISS else self._loads(blob, default)

    async def aset(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> None:
        k, blob, ttl = self._key(key, version), await self._adumps(value), self._ttl(timeout)
        if ttl <= 0:
            await self._s.cache.delete(k)
        else:
            await self._s.cache.set(k, blob, ttl=ttl)

    async def aadd(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        k, blob, ttl = self._key(key, version), await self._adumps(value), self._ttl(timeout)
        return bool(await self._s.aupdate("add", k, self._s.adder(blob, ttl)))

    async def aget_or_set(
        self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        k, ttl = self._key(key, version), self._ttl(timeout)
        if ttl <= 0:
            blob = await self._s.cache.get(k, _MISS)
            if blob is not _MISS:
                return self._loads(blob, None)
            return default() if callable(default) else default

        async def load() -> bytes:
            return await self._adumps(default() if callable(default) else default)

        return self._loads(await self._s.cache.get_cached(k, load, ttl=ttl), None)

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        k, ttl = self._key(key, version), self._ttl(timeout)
        if ttl <= 0:
            return await self.adelete(key, version=version)
        result: bool = await self._s.aupdate("touch", k, self._toucher(ttl))
        return result

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        k = self._key(key, version)
        state = self._s
        try:
            old, _ = await aread_for_update(state.redis, state.cache.full_key(k))
            existed = old is not None and old.is_fresh(state.cache.clock())
        except Exception:
            existed = await state.cache.get(k, _MISS) is not _MISS
        await state.cache.delete(k)
        return existed

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        return await self._s.cache.get(self._key(key, version), _MISS) is not _MISS

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return await self._s.aupdate("incr", self._key(key, version), self._bump(key, delta))

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return await self._s.aupdate("decr", self._key(key, version), self._bump(key, -delta))

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        names = {self._key(key, version): key for key in keys}
        if not names:
            return {}
        found = await self._s.cache.get_many_cached(list(names), _load_nothing)
        out = {}
        for k, blob in found.items():
            value = self._loads(blob, _MISS)
            if value is not _MISS:
                out[names[k]] = value
        return out

    async def aset_many(
        self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        for key, value in data.items():
            await self.aset(key, value, timeout, version=version)
        return []

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        cache = self._s.cache
        for key in keys:
            await cache.delete(self._key(key, version))

    async def aclear(self) -> None:
        await self._s.cache.clear()

    async def aclose(self, **kwargs: Any) -> None:
        """As ``close``: nothing to do per request."""
