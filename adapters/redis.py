"""RedisTier: the shared L2 on Redis (standalone, Cluster, Sentinel), version-fenced, with a stampede lease.

Stored format
=============

For a full cache key ``K`` (already namespaced by the core, e.g. ``app:user:42``) the tier uses:

* the *name* ``N``: ``K`` itself; or, when ``K`` is longer than ``max_key_bytes`` UTF-8 bytes,
  ``tiercache._keys.hashed_key(K, max_key_bytes)``; or, when that contains ``}`` (which would cut a
  Cluster hash tag short), ``<start>#b:<sha256(K)>`` where ``<start>`` is the part of ``K`` before
  its first ``}``, cut to ``max_key_bytes - 67`` bytes (so ``clear`` can still match the namespace).
  The entry carries ``K``, so a record whose key is not the requested one (a collision, or a
  foreign writer) is a miss, never a wrong answer;
* the value key ``<prefix>:{N}`` and the lease key ``<prefix>:{N}:lease``. Both hash on the tag
  ``N``, so they live in one Cluster slot and a Lua script may touch both;
* the wake channel ``<prefix>:wake`` (one per prefix; the message is the value key).

A value key holds a *record*: a 24-byte ASCII header followed by a body::

    b"tc1"          format marker (3 bytes)
    b"v" | b"d"     kind: a value, or a tombstone left by a versioned delete (1 byte; "e": below)
    b"%020d"        the entry's version, zero-padded to 20 digits (20 bytes)
    body            kind "v": the codec's envelope (default: the JSON envelope of
                    ``tiercache._serde``); kind "d": empty

A third kind, ``b"e"`` (an *expired* value, written only by ``expire``), extends the header by a
24-byte field, so its body starts at byte 48::

    b"tc1" b"e" b"%020d"   as above; the version is the ``expire`` call's, newer than the body's
    b"%-24s"               ``repr(at)`` of the expiry time (Unix seconds), space-padded
    body                   the envelope exactly as it was written (its own "f" and "n" untouched)

A reader applies it: ``fresh_until = min(envelope "f", at)`` and ``version = header version``. So
``expire`` rewrites no JSON (Lua's cjson would lose float precision and reorder the envelope);
it prepends a header in one script. Older readers see an unknown kind: a miss, never a fresh hit.

With a signing codec (``tiercache.signing.SignedCodec``) a tombstone is followed by a 64-hex
HMAC of its header and the key, kind "e" is never written (``expire`` rewrites a signed "v"
record), and a record whose header is not authentic is a corrupt miss that the next write or
delete replaces (see "signed records" below).

The header lets a Lua script compare versions with one ``GETRANGE key 0 23`` instead of decoding
the envelope (and equal-width digit strings compare exactly, which Lua's double-precision numbers
cannot do for 19-digit versions: see ``_LUA_NEWER``). The physical TTL (``PX``) of a value is
``stale_until - now`` of the entry (after clamping to ``max_ttl``), in milliseconds; dead entries
are not written at all. A tombstone lives ``tombstone_ttl`` seconds.

Writes and reads
================

* ``set`` runs a Lua *set-if-newer*: the stored record is replaced only if it is absent, foreign, or
  of a lower version (a tombstone also refuses an equal version), so a late loader result never
  overwrites a newer ``set`` or a ``delete``.
* ``delete(key, version)`` writes a tombstone of ``version`` unless a newer record is there.
* ``get`` decodes the record and checks the entry's times with the bound clock; bytes that are not
  a record, or not a valid envelope, are a miss reported as an ``EventKind.CORRUPT`` event.
* ``get_many``: one ``MGET`` (Cluster: ``mget_nonatomic``, one MGET per slot, pipelined per node);
  ``set_many``: one pipeline of set-if-newer scripts (Cluster: grouped per node by redis-py).
* ``expire(key, at, version)``: one script; if a value of a lower version is stored, it becomes a
  kind-``e`` record of ``version`` (fresh until ``min(fresh_until, at)``, repeated expiries keep the
  earliest) with ``SET ... KEEPTTL``: stale_until and the physical TTL are unchanged. Tombstones,
  newer records and foreign bytes are left alone.
* ``clear(prefix)``: ``SCAN MATCH <prefix-of-tier>:{<prefix>*`` + ``UNLINK`` per page (Cluster: on
  every primary, the UNLINKs grouped per node in one pipeline). It removes values and tombstones,
  leaves leases (they expire by themselves; deleting one would let a second loader start) and
  touches nothing outside the pattern. Names keep the key's readable start even when hashed (see
  above), so the pattern finds every key of a namespace whose prefix fits in ``max_key_bytes - 67``
  bytes and has no ``}``; for other prefixes the hashed names are checked by reading their entry.

Tags
====

``TagStore``: one hash per namespace, ``<prefix>:tags:{<namespace>}``, field = tag, value =
``repr()`` of the invalidation time (signed with a ``SignedCodec``, and validated on read: see
``tiercache._tag_seal``). ``get_tag_times`` is one ``HMGET``; ``set_tag_times`` is one
script that moves each field to ``max(old, at)``, so any number of tags costs one round trip and
times never go back. The hash has no TTL (one small hash per namespace).

The lease
=========

``acquire_lease`` is ``SET <lease key> <token> NX PX``; ``release_lease`` and ``extend_lease`` are
Lua compare-and-delete / compare-and-pexpire on the token. A crashed holder's lease just expires.
``set`` publishes the value key on the wake channel when a lease is held for the key, and
``release_lease`` publishes when it deletes the lease. ``wait_for_entry`` registers with one
subscriber connection per tier (a thread for the sync face, a task per event loop for the async
face) that multiplexes all waiting keys on that single channel, so a wait costs no SUBSCRIBE of its
own. Each waiter reads value and lease TTL in one script call, then sleeps until a wake message,
the lease's expiry (a crashed leader), or its deadline; while the subscriber is not connected it
polls with jittered backoff (10 ms doubling to 100 ms) instead. It never busy-polls.

Failure policy
==============

Every redis-py error propagates (the core turns it into a miss or a skipped write and runs the
circuit breaker), except a Cluster node's failure while other primaries answer: that one the
tier turns into a miss / skipped write itself and reports as an event (see the Cluster section of
``RedisTier``), so the core's tier-wide breaker stays closed for the live slots. Connections use
short socket/connect timeouts, ``Retry(NoBackoff(), 0)`` (no blind retries), bounded pools, RESP2
by default (redis-py 8 would speak RESP3), and no ``CLIENT SETINFO`` round trips on connect.
Secrets in a URL (userinfo, ``?password=``, ``?ssl_password=``...) never appear in ``repr``.

The asyncio pool (``_async_pool_class``) queues waiters FIFO, and on its lean path (reads and
scripts) bounds a reply by the *server's* time, not by event-loop congestion (``read_reply``): a
burst of misses must queue, not turn into timeouts and an open breaker.

The miss in three round trips
=============================

``GET`` (the first read), then ``acquire_lease`` runs one script that takes the lease and reads
the value (the flight's re-read is then answered from that, with no round trip, if it comes
within ``_PREFETCH_LIFE``), then the write of the loaded value carries the lease token (the
tier remembers the leases this process holds) and releases it in the same script, so the
following ``release_lease`` costs nothing. No change in the core was needed.

Event loops: the async face keeps one client per running loop (weakly keyed by the loop). A loop
that ``asyncio.run`` shuts down cancels the tier's keeper task, which closes that loop's client, so a
handler calling ``asyncio.run`` on every invocation (AWS Lambda) works on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import math
import os
import random
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from tiercache.tier import MAX_CLOCK_SKEW as MAX_SKEW
from tiercache.tier import (
    Codec,
    ConfigurationError,
    Duration,
    Entry,
    Event,
    EventKind,
    JsonCodec,
    TierBinding,
    emit_safely,
    hashed_key,
    seal_tag_time,
    seconds,
    unseal_tag_time,
)

__all__ = ["NodeUnavailableError", "RedisBus", "RedisTier"]

logger = logging.getLogger("tiercache.redis")

_MAGIC = b"tc1"
_VALUE = b"v"
_TOMBSTONE = b"d"
_EXPIRED = b"e"
_HEADER_LEN = 24
_EXPIRED_HEADER_LEN = 48  # kind "e": the 24-byte header, then the expiry time in 24 bytes
_MAX_VERSION = 2**64 - 1  # the envelope (orjson) holds unsigned 64-bit ints; 20 digits fit it
_FOREIGN = 0  # what a script returns, in place of a record, for a key holding a hash, list, set...
_PREFETCH_LIFE = 0.5  # seconds a value read with the lease waits for the leader's re-read
_LEASE_MEMORY = 4096  # leases (taken, or released by a write) remembered per tier, at most

# Lua: is the 24-byte header ``h`` ours, and is version string ``a`` newer than ``b``? Versions are
# 20-digit strings; they are compared as two 10-digit halves, each exact in a double (a whole
# 19-digit nanosecond version is not), and independent of the server's collation locale.
_LUA_NEWER = """
local function ours(h)
  return string.len(h) == 24 and string.sub(h, 1, 3) == 'tc1' and not string.find(h, '%D', 5)
end
local function newer(a, b)
  local ah, bh = tonumber(string.sub(a, 1, 10)), tonumber(string.sub(b, 1, 10))
  if ah ~= bh then return ah > bh end
  return tonumber(string.sub(a, 11, 20)) > tonumber(string.sub(b, 11, 20))
end
"""

# KEYS: value, lease. ARGV: record, ttl ms, wake channel, value key, lease token ('' if none).
# 1 = written, 0 = refused (a newer record is stored), 2 = written over a foreign Redis type.
# With a token, the lease is released in the same call if it is still ours (write + release: one
# round trip); waiters are woken once, when the value is written or the lease released.
_LUA_SET = (
    _LUA_NEWER
    + """
local h = redis.pcall('GETRANGE', KEYS[1], 0, 23)
local wrote = 1
if type(h) == 'table' then
  wrote = 2
elseif ours(h) then
  local old, new = string.sub(h, 5, 24), string.sub(ARGV[1], 5, 24)
  if newer(old, new) or (string.sub(h, 4, 4) == 'd' and old == new) then wrote = 0 end
end
if wrote > 0 then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
local released = ARGV[5] ~= '' and redis.call('GET', KEYS[2]) == ARGV[5]
if released then redis.call('DEL', KEYS[2]) end
if released or (wrote > 0 and redis.call('EXISTS', KEYS[2]) == 1) then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return wrote
"""
)

# KEYS: value. ARGV: tombstone record, tombstone ttl ms (0: plain delete). 1 = deleted, 0 = kept.
# A foreign Redis type under the key (a hash, a list...) is replaced too (pcall: no WRONGTYPE).
_LUA_DELETE = (
    _LUA_NEWER
    + """
local h = redis.pcall('GETRANGE', KEYS[1], 0, 23)
if type(h) == 'string' and ours(h) and newer(string.sub(h, 5, 24), string.sub(ARGV[1], 5, 24)) then
  return 0
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1
"""
)

# KEYS: value. ARGV: version (20 digits), expiry time (24 bytes). 1 = expired, 0 = left alone.
# Invariant: an "e" record's version is newer than its body's; its time field only ever goes down.
_LUA_EXPIRE = (
    _LUA_NEWER
    + """
local r = redis.pcall('GET', KEYS[1])
if type(r) ~= 'string' then return 0 end
local h = string.sub(r, 1, 24)
if not ours(h) then return 0 end
local kind = string.sub(h, 4, 4)
if kind ~= 'v' and kind ~= 'e' then return 0 end
if not newer(ARGV[1], string.sub(h, 5, 24)) then return 0 end
local at, body = ARGV[2], string.sub(r, 25)
if kind == 'e' then
  local old = tonumber(string.sub(r, 25, 48))
  if string.len(r) < 48 or old == nil then return 0 end
  if old < tonumber(at) then at = string.sub(r, 25, 48) end
  body = string.sub(r, 49)
end
redis.call('SET', KEYS[1], 'tc1e' .. ARGV[1] .. at .. body, 'KEEPTTL')
return 1
"""
)

# KEYS: tag hash. ARGV: time, latest plausible time, then (tag, stored time) pairs. Each tag's
# time becomes max(its time, ARGV[1]); a stored time that is unreadable, NaN or later than
# ARGV[2] counts as missing (NaN compares false both ways: it would block every later time).
# A stored time is a number, optionally followed by "|kid|mac" (tiercache._tag_seal).
_LUA_TAGS = """
local at = tonumber(ARGV[1])
local latest = tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local old = nil
  if raw then old = tonumber(string.match(raw, '^[^|]*')) end
  if old == nil or old ~= old or old > latest or old < at then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""

# KEYS: lease. ARGV: token, wake channel, value key.
_LUA_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: token, ttl ms.
_LUA_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: value, lease. Returns {record or nil (0: a foreign Redis type), lease PTTL in ms (-2: none)}.
_LUA_PEEK = """
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then v = 0 end
return {v, redis.call('PTTL', KEYS[2])}
"""

# KEYS: value, lease. ARGV: token, lease ttl ms. Takes the lease and, if taken, reads the value in
# the same call (the leader's re-read): {1, record or nil (0: a foreign Redis type)} or {0}.
_LUA_LEASE = """
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then v = 0 end
return {1, v}
"""


_NOT_READ: Any = object()  # no prefetched value for this key
_NODE_DOWN_TOKEN = "<cluster node unavailable>"  # acquire_lease's answer then: load without a lease
_NODE_THRESHOLD = 3  # failures in a row that make the tier skip a Cluster node...
_NODE_COOLDOWN = 1.0  # ...for this many seconds (then one call probes it)


class NodeUnavailableError(Exception):
    """A Redis Cluster node failed (or is skipped after failing) while other nodes answer.

    The tier never lets it reach the core: the call becomes a miss (or a skipped write, or a load
    without a lease) and the tier reports a TIER_ERROR (or TIER_SKIPPED) event naming the node.
    """

    def __init__(self, node: str, cause: BaseException | None) -> None:
        self.node = node
        self.cause = cause
        what = f"failed: {_describe(cause)}" if cause is not None else "is skipped after repeated failures"
        super().__init__(f"Redis Cluster node {node} {what}")


class _NodeHealth:
    """Per-node circuit breakers of a Cluster tier (so one dead master costs only its own slots)."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self.open_until: dict[str, float] = {}

    def allows(self, node: str) -> bool:
        until = self.open_until.get(node)
        if until is None:
            return True
        now = time.monotonic()
        if now < until:
            return False
        self.open_until[node] = now + _NODE_COOLDOWN  # this caller probes; the others keep skipping
        return True

    def healthy(self, node: str) -> bool:
        return self.failures.get(node, 0) < _NODE_THRESHOLD

    def failed(self, node: str) -> None:
        failures = self.failures.get(node, 0) + 1
        self.failures[node] = failures
        if failures >= _NODE_THRESHOLD:
            self.open_until[node] = time.monotonic() + _NODE_COOLDOWN

    def ok(self, node: str) -> None:
        if node in self.failures:
            self.failures.pop(node, None)
            self.open_until.pop(node, None)


def _node_level(exc: BaseException) -> bool:
    """Is ``exc`` a failure of one node (not of the request, not of the whole cluster)?"""
    import redis.exceptions
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import SlotNotCoveredError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    exhausted = getattr(redis.exceptions, "MaxConnectionsError", None)
    if exhausted is not None and isinstance(exc, exhausted):
        return False  # our side ran out of connections: the node is fine
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, SlotNotCoveredError, OSError))


def _remember(table: dict[str, str], vkey: str, token: str) -> None:
    """``table[vkey] = token``, forgetting the oldest entries beyond ``_LEASE_MEMORY``."""
    table.pop(vkey, None)
    table[vkey] = token
    while len(table) > _LEASE_MEMORY:
        del table[next(iter(table))]


# KEYS: value. ARGV: the record expected there now, its replacement ("" deletes), ttl ms or
# "keep". Only used with a signing codec, to overwrite a record whose header is not authentic.
_LUA_REPLACE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
elseif ARGV[3] == 'keep' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""


_HEAL_ATTEMPTS = 3  # fenced sends of one write when forged records keep refusing it
_NUMKEYS = {"set": 2, "delete": 1}


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()  # Redis names scripts by SHA-1


_SCRIPTS = {
    name: (body, _sha(body))
    for name, body in (
        ("set", _LUA_SET),
        ("delete", _LUA_DELETE),
        ("release", _LUA_RELEASE),
        ("extend", _LUA_EXTEND),
        ("peek", _LUA_PEEK),
        ("lease", _LUA_LEASE),
        ("expire", _LUA_EXPIRE),
        ("tags", _LUA_TAGS),
        ("replace", _LUA_REPLACE),
    )
}

# How long an operation waits in the pool's queue for a connection when none is given
# (``pool_timeout=None``). Long enough that a burst (say 1,000 misses at once on 32 connections,
# a few thousand commands) queues and is served in order instead of failing; short enough that a
# wedged pool is reported. A caller's own deadline (``asyncio.timeout``, a cancelled request)
# ends the wait sooner: a cancelled waiter leaves the queue at once.
DEFAULT_POOL_TIMEOUT = 2.0

_SCAN_COUNT = 1000  # keys per SCAN page in clear(); each page's matches go in one UNLINK (or pipeline)

_INSTALL_HINT = "RedisTier needs redis-py: pip install 'tiercache-py[redis]'"


def _import_redis() -> Any:
    try:
        import redis
        import redis.asyncio
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None
    return redis


# Query parameters whose value is a secret (``?password=``, ``ssl_password=``, a token...).
_SECRET_PARAM = re.compile(r"(?i)(pass|secret|token|credential|auth)")


def _redact(url: str) -> str:
    """``url`` with every secret replaced by ``***``: the userinfo password and the value of any
    query parameter named like a secret (``password``, ``ssl_password``, ``...token``)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{hostport}"
        query = "&".join(
            f"{name}=***" if sep and _SECRET_PARAM.search(unquote(name)) else f"{name}{sep}{value}"
            for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
        )
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:  # not parseable as a URL: show nothing of it
        return "<unparseable URL>"


def _describe(exc: BaseException) -> str:
    """An exception for a log line or a health check: its type and message (no secret: redis-py
    names host and port only)."""
    return f"{type(exc).__name__}: {exc}"


def _version_bytes(version: int) -> bytes:
    if type(version) is not int or not 0 <= version <= _MAX_VERSION:
        raise ValueError(f"RedisTier stores versions from 0 to 2**64-1, not {version!r}")
    return b"%020d" % version


def _time_field(at: float) -> bytes:
    """``at`` as the 24-byte expiry field of a kind-``e`` header: ``repr`` (exact), space-padded."""
    at = float(at)
    if not math.isfinite(at):
        raise ValueError(f"RedisTier: expiry time must be finite, not {at!r}")
    return repr(at).encode("ascii").ljust(24)  # a float's repr is at most 24 characters


def _time_arg(at: float) -> str:
    """A time for a script argument: ``repr`` round-trips exactly through Lua's ``tonumber``."""
    at = float(at)
    if not math.isfinite(at):
        raise ValueError(f"RedisTier: time must be finite, not {at!r}")
    return repr(at)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class _Hub:
    """Who waits for which value key: wake callbacks, fed by the subscriber(s). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Callable[[], None]]] = {}

    def add(self, vkey: str, wake: Callable[[], None]) -> None:
        with self._lock:
            self._waiters.setdefault(vkey, set()).add(wake)

    def remove(self, vkey: str, wake: Callable[[], None]) -> None:
        with self._lock:
            group = self._waiters.get(vkey)
            if group is not None:
                group.discard(wake)
                if not group:
                    del self._waiters[vkey]

    def notify(self, vkey: str) -> None:
        with self._lock:
            wakes = list(self._waiters.get(vkey, ()))
        for wake in wakes:
            wake()

    def notify_all(self) -> None:
        """A subscriber (re)connected or dropped: messages may be lost, so everyone re-reads."""
        with self._lock:
            wakes = [w for group in self._waiters.values() for w in group]
        for wake in wakes:
            wake()


class _SyncSubscriber:
    """The sync face's subscriber: one daemon thread and one pub/sub connection per tier."""

    def __init__(self, tier: RedisTier) -> None:
        self._tier = tier
        self.ready = threading.Event()
        self._stop = threading.Event()
        self.pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="tiercache-redis-wake", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tier = self._tier
        backoff = 0.05
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = tier._sync_client().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(tier._channel)
                self.ready.set()
                tier._hub.notify_all()
                backoff = 0.05
                while not self._stop.is_set():
                    # A short read timeout only so that close() is noticed; it sends no command.
                    msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                    if msg is not None and msg.get("type") == "message":
                        tier._hub.notify(_text(msg["data"]))
            except Exception:  # any failure: drop, tell waiters, reconnect later
                self.ready.clear()
                tier._hub.notify_all()
                self._stop.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 2.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
        self.ready.clear()

    def stop(self, wait: bool) -> None:
        self._stop.set()
        if wait and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)


class _LoopState:
    """What the tier keeps per event loop: its client, its subscriber task, the keeper task."""

    __slots__ = (
        "__weakref__",
        "client",
        "closed",
        "gates",
        "keeper",
        "loop_ref",
        "pool",
        "ready",
        "subscriber",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, client: Any) -> None:
        self.loop_ref = weakref.ref(loop)
        self.client = client
        # The tier's own standalone pool, which reads take connections from directly (see
        # aget); None for Cluster, Sentinel and user-supplied clients.
        pool = getattr(client, "connection_pool", None)
        self.pool = pool if _POOL_CLASS is not None and type(pool) is _POOL_CLASS else None
        self.keeper: asyncio.Task[None] | None = None
        self.subscriber: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self.closed = False
        # Cluster: commands in flight per node, at most max_connections (redis-py's async Cluster
        # client raises MaxConnectionsError instead of waiting): node name -> semaphore.
        self.gates: dict[str | None, asyncio.Semaphore] = {}


def _text(data: Any) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)


class RedisTier:
    """A shared tier on Redis. See the module docstring for the stored format and the guarantees.

    Give exactly one of: ``url`` (``redis://``, ``rediss://``, ``unix://``; ``redis+cluster://`` or
    ``cluster=True`` for Cluster), ``client``/``async_client`` (your own redis-py clients; the tier
    does not close them), or ``sentinels`` with ``service_name``.
    """

    in_process = False
    shared = True
    offers_lease = True

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        async_client: Any = None,
        cluster: bool = False,
        sentinels: Sequence[tuple[str, int]] | None = None,
        service_name: str | None = None,
        sentinel_kwargs: dict[str, Any] | None = None,
        protocol: int = 2,
        socket_timeout: float = 0.25,
        connect_timeout: float = 0.25,
        max_connections: int = 32,
        pool_timeout: float | None = None,
        prefix: str = "tc",
        max_ttl: Duration | None = None,
        max_key_bytes: int = 256,
        tombstone_ttl: float = 10.0,
        max_value_bytes: int = 512 * 1024 * 1024,
        max_read_bytes: int = 64 * 1024 * 1024,
        name: str = "redis",
        client_kwargs: dict[str, Any] | None = None,
    ) -> None:
        given = [url is not None, client is not None or async_client is not None, sentinels is not None]
        if sum(given) != 1:
            raise ConfigurationError("RedisTier needs exactly one of url=, client=/async_client=, sentinels=")
        if "{" in prefix or "}" in prefix or not prefix:
            raise ConfigurationError("RedisTier.prefix must be non-empty and free of '{' and '}'")
        if socket_timeout <= 0 or connect_timeout <= 0:
            raise ConfigurationError("RedisTier timeouts must be positive")
        if max_connections < 2:
            raise ConfigurationError("RedisTier.max_connections must be at least 2")
        max_ttl = None if max_ttl is None else seconds(max_ttl, "RedisTier.max_ttl")  # 30, "1h"...
        if max_ttl is not None and max_ttl <= 0:
            raise ConfigurationError("RedisTier.max_ttl must be positive")
        if max_key_bytes < 80:
            raise ConfigurationError("RedisTier.max_key_bytes must be at least 80")
        if tombstone_ttl < 0:
            raise ConfigurationError("RedisTier.tombstone_ttl must not be negative")
        if sentinels is not None and not service_name:
            raise ConfigurationError("RedisTier(sentinels=...) needs service_name=")
        self._redis = _import_redis()
        self.name = name
        # Redis refuses strings over proto-max-bulk-len (512 MiB by default); the core checks
        # this before sending, so an oversize value is refused up front, not after a round trip.
        # A record longer than max_read_bytes is never decoded (a corrupt miss): a value planted
        # by anyone with write access cannot make every reader allocate hundreds of MB. Writes
        # above it would be unreadable, so the write limit never exceeds it.
        if max_read_bytes < 1024:
            raise ConfigurationError("RedisTier.max_read_bytes must be at least 1024")
        self.max_read_bytes = max_read_bytes
        self.max_value_bytes = min(max_value_bytes, max_read_bytes - _EXPIRED_HEADER_LEN)
        self.max_ttl = max_ttl
        self.prefix = prefix
        self.max_key_bytes = max_key_bytes
        self.tombstone_ttl = tombstone_ttl
        self.socket_timeout = socket_timeout
        self._sweeps: set[asyncio.Task[None]] = set()  # see _unsure_lease
        self.connect_timeout = connect_timeout
        self._protocol = protocol
        self._max_connections = max_connections
        if pool_timeout is not None and pool_timeout <= 0:
            raise ConfigurationError("RedisTier.pool_timeout must be positive")
        self._pool_timeout = pool_timeout if pool_timeout is not None else DEFAULT_POOL_TIMEOUT
        self._extra = dict(client_kwargs or {})
        self._sentinels = [(str(h), int(p)) for h, p in sentinels] if sentinels is not None else None
        self._service_name = service_name
        self._sentinel_kwargs = sentinel_kwargs
        self._url: str | None = None
        self._cluster = cluster
        if url is not None:
            scheme = urlsplit(url).scheme.lower()
            if scheme in ("redis+cluster", "rediss+cluster"):
                self._cluster = True
                url = scheme.split("+", 1)[0] + url[len(scheme) :]
            elif scheme not in ("redis", "rediss", "unix"):
                raise ConfigurationError(f"RedisTier: unsupported URL scheme {scheme!r}")
            self._url = url
        self._user_sync = client if client is not None and not self._is_async(client) else None
        self._user_async = (
            async_client
            if async_client is not None
            else (client if client is not None and self._is_async(client) else None)
        )
        if client is not None and async_client is not None and self._is_async(client):
            raise ConfigurationError("RedisTier: client= is an asyncio client; pass a sync client there")
        if self._user_async is not None and not self._is_async(self._user_async):
            raise ConfigurationError("RedisTier: async_client= must be a redis.asyncio client")
        for c in (self._user_sync, self._user_async):
            if c is not None and self._is_cluster(c):
                self._cluster = True
            if c is not None and self._decodes(c):
                raise ConfigurationError("RedisTier needs a client with decode_responses=False")
        self._channel = f"{prefix}:wake"
        self._tags_key = f"{prefix}:tags:{{tc}}"  # until bind() names the namespace
        self._readable = max_key_bytes - 67  # bytes of a key a hashed name keeps (see _vkey)
        self._fast_len = max_key_bytes // 4  # this many characters always fit in max_key_bytes
        self._clock: Callable[[], float] = time.time
        self._codec: Codec = JsonCodec()
        self._on_event: Callable[[Event], None] = lambda event: None
        self._lock = threading.Lock()
        self._sync: Any = None
        self._sync_sub: _SyncSubscriber | None = None
        self._hub = _Hub()
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._last: _LoopState | None = None
        self._sent: set[str] = set()  # scripts this tier has sent in full (EVAL) at least once
        # The miss in three round trips (see "The lease"): what the lease script read, waiting for
        # the leader's re-read (value key -> (monotonic deadline, data)); the leases this process
        # holds (value key -> token), and those a write already released (value key -> token).
        self._prefetched: dict[str, tuple[float, Any]] = {}
        self._held: dict[str, str] = {}
        self._released: dict[str, str] = {}
        self._plock = threading.Lock()
        self._down = False  # a connect failure was logged and nothing connected since
        self._nodes = _NodeHealth()  # Cluster only
        self._sync_gates: dict[str | None, threading.BoundedSemaphore] = {}  # Cluster only
        # Commands in flight per Cluster node; two connections are left for the calls that do not
        # queue (clear, tags, the subscriber), so they never meet an exhausted node pool.
        self._node_gate_size = max(1, max_connections - 2)

    # --- configuration ----------------------------------------------------------------------

    def __repr__(self) -> str:
        target = self._target()
        return f"RedisTier(name={self.name!r}, {target}, cluster={self._cluster}, prefix={self.prefix!r})"

    def _target(self) -> str:
        """Where the tier connects, for repr, logs and health checks: never a secret."""
        if self._url is not None:
            return f"url={_redact(self._url)!r}"
        if self._sentinels is not None:
            return f"sentinels={self._sentinels!r}, service_name={self._service_name!r}"
        return "client=<given>"

    def _connect_failed(self, exc: BaseException) -> None:
        """A connection could not be made: one WARNING per outage, naming the address and cause."""
        if not self._down:
            self._down = True
            logger.warning("Redis tier %r cannot connect (%s): %s", self.name, self._target(), _describe(exc))

    def _connected(self) -> None:
        if self._down:
            self._down = False
            logger.warning("Redis tier %r connects again (%s)", self.name, self._target())

    def check(self) -> str | None:
        """Health check (sync face): None when the server answers a PING, else why not."""
        try:
            self._sync_client().ping()
        except Exception as exc:
            return f"{self._target()}: {_describe(exc)}"
        return None

    async def acheck(self) -> str | None:
        """Health check (async face): None when the server answers a PING, else why not."""
        try:
            await self._aclient().ping()
        except Exception as exc:
            return f"{self._target()}: {_describe(exc)}"
        return None

    def bind(self, binding: TierBinding) -> None:
        self._clock = binding.clock
        self._codec = binding.codec
        self._tags_key = f"{self.prefix}:tags:{{{binding.namespace}}}"
        hook = binding.on_event
        self._on_event = lambda event: emit_safely(hook, event)

    @staticmethod
    def _is_async(client: Any) -> bool:
        from redis.asyncio import Redis
        from redis.asyncio.cluster import RedisCluster

        return isinstance(client, (Redis, RedisCluster))

    @staticmethod
    def _is_cluster(client: Any) -> bool:
        from redis.asyncio.cluster import RedisCluster as AsyncCluster
        from redis.cluster import RedisCluster

        return isinstance(client, (RedisCluster, AsyncCluster))

    @staticmethod
    def _decodes(client: Any) -> bool:
        pool = getattr(client, "connection_pool", None)
        kwargs = getattr(pool, "connection_kwargs", None)
        if isinstance(kwargs, dict):
            return bool(kwargs.get("decode_responses"))
        encoder = getattr(client, "encoder", None)
        return bool(getattr(encoder, "decode_responses", False))

    def _conn_kwargs(self, retry_cls: Any) -> dict[str, Any]:
        from redis.backoff import NoBackoff

        kwargs: dict[str, Any] = {
            "protocol": self._protocol,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout,
            "retry": retry_cls(NoBackoff(), 0),  # a failed call fails; the core decides what next
        }
        if "driver_info" in inspect.signature(self._redis.connection.AbstractConnection.__init__).parameters:
            kwargs["driver_info"] = None  # no CLIENT SETINFO round trips on every new connection
        if self._url is not None and urlsplit(self._url).scheme.lower() == "rediss":
            # Verify the certificate and its host name whatever redis-py's default (5.x: off).
            # ``?ssl_check_hostname=false`` in the URL, or client_kwargs, can still turn it off.
            kwargs["ssl_cert_reqs"] = "required"
            kwargs["ssl_check_hostname"] = True
        kwargs.update(self._extra)
        return kwargs

    # --- clients ----------------------------------------------------------------------------

    def _sync_client(self) -> Any:
        client = self._sync
        if client is not None:
            return client
        with self._lock:
            if self._sync is None:
                self._sync = self._user_sync if self._user_sync is not None else self._make_sync()
            return self._sync

    def _make_sync(self) -> Any:
        redis = self._redis
        from redis.retry import Retry

        kwargs = self._conn_kwargs(Retry)
        if self._sentinels is not None:
            if self._user_async is not None:
                raise ConfigurationError("RedisTier: this tier has only an async client")
            from redis.sentinel import Sentinel as SyncSentinel

            sentinel_cls: Any = SyncSentinel  # untyped in redis-py
            sentinel = sentinel_cls(self._sentinels, sentinel_kwargs=self._sentinel_kwargs, **kwargs)
            return sentinel.master_for(self._service_name, max_connections=self._max_connections, **kwargs)
        if self._url is None:
            raise ConfigurationError("RedisTier: the sync face needs client= (a sync redis-py client)")
        if self._cluster:
            from redis.cluster import RedisCluster

            return RedisCluster.from_url(self._url, max_connections=self._max_connections, **kwargs)
        pool = _sync_pool_class().from_url(
            self._url, max_connections=self._max_connections, timeout=self._pool_timeout, **kwargs
        )
        pool.tier_ref = weakref.ref(self)
        return redis.Redis.from_pool(pool)

    def _make_async(self) -> Any:
        redis = self._redis
        from redis.asyncio.retry import Retry

        kwargs = self._conn_kwargs(Retry)
        if self._sentinels is not None:
            from redis.asyncio.sentinel import Sentinel as AsyncSentinel

            sentinel_cls: Any = AsyncSentinel  # untyped in redis-py
            sentinel = sentinel_cls(self._sentinels, sentinel_kwargs=self._sentinel_kwargs, **kwargs)
            return sentinel.master_for(self._service_name, max_connections=self._max_connections, **kwargs)
        if self._url is None:
            raise ConfigurationError("RedisTier: the async face needs async_client= (a redis.asyncio client)")
        if self._cluster:
            from redis.asyncio.cluster import RedisCluster

            return RedisCluster.from_url(self._url, max_connections=self._max_connections, **kwargs)
        # Connects and lean-path reads are bounded by the tier's timeouts, lag-tolerantly (see
        # _within); redis-py's own bound on a connect is the hard limit.
        kwargs["socket_connect_timeout"] = _HARD_LIMIT * self.connect_timeout
        pool = _async_pool_class().from_url(self._url, max_connections=self._max_connections, **kwargs)
        pool.read_limit = self.socket_timeout
        pool.connect_limit = self.connect_timeout
        pool.wait_timeout = self._pool_timeout
        pool.tier_ref = weakref.ref(self)
        pool.connection_class = _lean_connection_class(pool.connection_class)
        return redis.asyncio.Redis.from_pool(pool)

    def _state(self) -> _LoopState:
        """This loop's state (client, subscriber), created on first use in the loop."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last.loop_ref() is loop and not last.closed:
            return last
        with self._lock:
            state = self._states.get(loop)
            if state is None or state.closed:
                for old_loop in [lp for lp in self._states if lp.is_closed()]:
                    # Its keeper could not run (the loop was closed without cancelling tasks):
                    # forget it; the sockets are closed when the garbage collector takes them.
                    del self._states[old_loop]
                client = self._user_async if self._user_async is not None else self._make_async()
                state = _LoopState(loop, client)
                if self._user_async is None:
                    state.keeper = loop.create_task(self._keep(state))
                self._states[loop] = state
            self._last = state
            return state

    def _aclient(self) -> Any:
        if self._user_async is not None:
            return self._user_async
        return self._state().client

    async def _keep(self, state: _LoopState) -> None:
        """Sleeps until the loop shuts down (``asyncio.run`` cancels it), then closes the loop's client."""
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            await self._close_state(state)
            raise

    async def _close_state(self, state: _LoopState) -> None:
        if state.closed:
            return
        state.closed = True
        sub = state.subscriber
        if sub is not None and sub is not asyncio.current_task():
            sub.cancel()
            with contextlib.suppress(BaseException):
                await sub
        if state.client is not self._user_async:
            with contextlib.suppress(Exception):
                await state.client.aclose()

    # --- keys and records -------------------------------------------------------------------

    def _vkey(self, key: str) -> str:
        name = key
        if len(key) > self._fast_len:
            name = hashed_key(key, self.max_key_bytes)
        if "}" in name:  # a '}' would end the hash tag early; value and lease keys could split
            # Keep the key's start (before the '}') readable so clear() can match the namespace.
            start = key.split("}", 1)[0].encode("utf-8", "surrogatepass")[: self._readable]
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
            name = start.decode("utf-8", "ignore") + "#b:" + digest
        return f"{self.prefix}:{{{name}}}"

    def _encode(self, entry: Entry, now: float) -> tuple[bytes, int] | None:
        """The record to store and its TTL in ms, or None when the entry is already dead."""
        if self.max_ttl is not None:
            clamped = entry.clamped(now + self.max_ttl)
            if clamped is not entry:
                # Entry.clamped keeps the old payload, which encodes the unclamped times.
                clamped.payload = None
                entry = clamped
        remaining = entry.stale_until - now
        if not math.isfinite(remaining):
            raise ValueError(f"RedisTier: entry for {entry.key!r} has no finite lifetime")
        if remaining <= 0:
            return None
        header = _MAGIC + _VALUE + _version_bytes(entry.version)
        payload = entry.payload
        if payload is None:
            payload = self._codec.dumps(entry)
            entry.payload = payload
        return header + payload, math.ceil(remaining * 1000)

    def _decode(self, key: str, data: Any, now: float | None = None, report: bool = True) -> Entry | None:
        """The live entry in ``data`` (a record) for ``key``, or None. Never raises for bad bytes.

        ``data`` is what GET returned, or ``_FOREIGN`` for a key holding another Redis type. Bad
        data is a miss reported as a CORRUPT event, unless ``report`` is False (a re-read of what
        the same flight's first read already reported)."""
        if data is None:
            return None
        if type(data) is int:  # _FOREIGN
            return self._corrupt(key, "the key holds another Redis type (not a string)", report)
        if not isinstance(data, bytes) or len(data) < _HEADER_LEN or data[:3] != _MAGIC:
            return self._corrupt(key, "not a tiercache record", report)
        if len(data) > self.max_read_bytes:
            return self._corrupt(key, f"record of {len(data)} bytes is over max_read_bytes", report)
        kind = data[3:4]
        if kind == _TOMBSTONE:
            return None
        try:
            version = int(data[4:_HEADER_LEN])
        except ValueError:
            return self._corrupt(key, "bad record header", report)
        expired_at: float | None = None
        if kind == _VALUE:
            payload = data[_HEADER_LEN:]
        elif kind == _EXPIRED:
            if self._signer() is not None:  # a signing cache never writes one: forged
                return self._corrupt(key, "unsigned expiry header")
            try:
                expired_at = float(data[_HEADER_LEN:_EXPIRED_HEADER_LEN])
            except ValueError:
                return self._corrupt(key, "bad expiry field", report)
            payload = data[_EXPIRED_HEADER_LEN:]
        else:
            return self._corrupt(key, "unknown record kind", report)
        try:
            entry = self._codec.loads(payload)
        except Exception as exc:  # any codec failure means the bytes are unusable
            return self._corrupt(key, f"undecodable envelope ({type(exc).__name__})", report)
        if entry.key != key or entry.version > version or (expired_at is None and entry.version != version):
            return self._corrupt(key, "record belongs to another key or version", report)
        if entry.stale_until <= (self._clock() if now is None else now):
            return None
        if expired_at is not None:
            # The header wins: the entry is the expire()'s version, fresh until the earlier time.
            # Its payload (old "f" and "n") must not be copied to another tier: replace() drops it.
            return entry.replace(fresh_until=min(entry.fresh_until, expired_at), version=version)
        entry.payload = payload
        return entry

    def _corrupt(self, key: str, why: str, report: bool = True) -> Entry | None:
        if report:
            self._on_event(Event(EventKind.CORRUPT, key, tier=self.name, error=ValueError(why)))
        return None

    def _set_args(self, key: str, entry: Entry, now: float) -> tuple[Any, ...] | None:
        encoded = self._encode(entry, now)
        if encoded is None:
            return None
        record, ttl_ms = encoded
        vkey = self._vkey(key)
        return (vkey, vkey + ":lease", record, ttl_ms, self._channel, vkey, "")

    def _delete_args(self, key: str, version: int) -> tuple[Any, ...]:
        record = _MAGIC + _TOMBSTONE + _version_bytes(version)
        signer = self._signer()
        if signer is not None:  # a signed tombstone: its kind and version cannot be forged
            record += signer.record_mac(key, record)
        return (self._vkey(key), record, _ms(self.tombstone_ttl) if self.tombstone_ttl > 0 else 0)

    # --- signed records: the header is authenticated too --------------------------------------
    #
    # With a signing codec (tiercache.signing.SignedCodec) a value record's header must match its
    # signed envelope (kind "v", version == the envelope's "n", checked in _decode), a tombstone
    # carries an HMAC of its header, and "e" records are never written (expire rewrites a signed
    # "v" record instead). The Lua fences cannot verify a MAC (no secret on the server), so a
    # write or delete a fence refused checks the record in the way: if it is not authentic (a
    # rewritten header pinning a huge version, a forged tombstone), it is deleted if still the
    # same bytes and the write goes through its fence again (_fenced, below).

    def _signer(self) -> Any:
        codec = self._codec
        return codec if hasattr(codec, "record_mac") and hasattr(codec, "verify_record") else None

    def _authentic(self, key: str, data: Any) -> bool:
        if not isinstance(data, bytes) or len(data) < _HEADER_LEN or data[:3] != _MAGIC:
            return False
        kind, header = data[3:4], data[:_HEADER_LEN]
        if kind == _TOMBSTONE:
            signer = self._signer()
            return signer is not None and signer.verify_record(key, header, data[_HEADER_LEN:])
        if kind != _VALUE:
            return False
        try:
            entry = self._codec.loads(data[_HEADER_LEN:])
            return entry.key == key and entry.version == int(header[4:])
        except Exception:
            return False

    # A fence refused a write over a record that is not authentic: delete it (only if still the
    # same bytes) and send the write again through its fence. Never overwrite it directly: two
    # writers can find the same forged record, and the one whose overwrite lands last would win
    # whatever their versions; re-fenced, the newer one wins, and its script publishes as usual.
    # Bounded: a forger rewriting the record all the time costs a write a few round trips.

    def _forged(self, key: str, old: Any) -> bool:
        return old is not None and not self._authentic(key, old)

    def _fenced(self, client: Any, script: str, key: str, args: tuple[Any, ...]) -> bool:
        """Run a fenced write; False when a genuine newer record refused it."""
        for _ in range(_HEAL_ATTEMPTS):
            if self._eval(client, script, _NUMKEYS[script], *args) != 0:
                return True
            if self._signer() is None:
                return False
            old = client.get(self._vkey(key))
            if old is not None and not self._forged(key, old):
                return False  # refused by a genuine newer record: the fence was right
            if old is not None:
                self._eval(client, "replace", 1, self._vkey(key), old, b"", "keep")
        return False

    async def _afenced(self, client: Any, script: str, key: str, args: tuple[Any, ...]) -> bool:
        for _ in range(_HEAL_ATTEMPTS):
            if await self._aeval(client, script, _NUMKEYS[script], *args) != 0:
                return True
            if self._signer() is None:
                return False
            old = await client.get(self._vkey(key))
            if old is not None and not self._forged(key, old):
                return False
            if old is not None:
                await self._aeval(client, "replace", 1, self._vkey(key), old, b"", "keep")
        return False

    def _signed_expire_args(self, key: str, old: Any, at: float, version: int) -> tuple[Any, ...] | None:
        if not self._authentic(key, old) or old[3:4] != _VALUE:
            return None
        entry = self._codec.loads(old[_HEADER_LEN:])
        if entry.version >= version:
            return None
        expired = entry.replace(fresh_until=min(entry.fresh_until, at), version=version, typed=False)
        record = _MAGIC + _VALUE + _version_bytes(version) + self._codec.dumps(expired)
        return (self._vkey(key), old, record, "keep")

    # --- script helpers ---------------------------------------------------------------------

    # A script's first call from this tier is an EVAL, which also caches it on the server, so a
    # cold server costs no NOSCRIPT round trip; later calls send only the SHA. A NOSCRIPT (server
    # restarted, SCRIPT FLUSH, another Cluster node) falls back to EVAL for that call.

    def _eval(self, client: Any, script: str, numkeys: int, *args: Any) -> Any:
        if self._cluster and numkeys:  # the script's keys share the slot of its first key
            return self._guard(client, args[0], lambda: self._eval_plain(client, script, numkeys, *args))
        return self._eval_plain(client, script, numkeys, *args)

    def _eval_plain(self, client: Any, script: str, numkeys: int, *args: Any) -> Any:
        body, sha = _SCRIPTS[script]
        if script not in self._sent:
            self._sent.add(script)
            return client.eval(body, numkeys, *args)
        try:
            return client.evalsha(sha, numkeys, *args)
        except self._redis.exceptions.NoScriptError:
            return client.eval(body, numkeys, *args)

    async def _aeval(self, client: Any, script: str, numkeys: int, *args: Any) -> Any:
        if self._cluster and numkeys:  # the script's keys share the slot of its first key
            return await self._aguard(
                client, args[0], lambda: self._aeval_plain(client, script, numkeys, *args)
            )
        return await self._aeval_plain(client, script, numkeys, *args)

    async def _aeval_plain(self, client: Any, script: str, numkeys: int, *args: Any) -> Any:
        body, sha = _SCRIPTS[script]
        pool = self._state().pool if self._user_async is None else None
        if pool is not None:  # the tier's own pool: the lean path, as aget
            if script not in self._sent:
                self._sent.add(script)
                return await _lean_call(pool, "EVAL", body, numkeys, *args)
            try:
                return await _lean_call(pool, "EVALSHA", sha, numkeys, *args)
            except self._redis.exceptions.NoScriptError:
                return await _lean_call(pool, "EVAL", body, numkeys, *args)
        if script not in self._sent:
            self._sent.add(script)
            return await client.eval(body, numkeys, *args)
        try:
            return await client.evalsha(sha, numkeys, *args)
        except self._redis.exceptions.NoScriptError:
            return await client.eval(body, numkeys, *args)

    def _check_pipeline(self, results: Sequence[Any]) -> list[int]:
        """Indexes of pipeline results that failed with NOSCRIPT; raises any other error."""
        retry = []
        for i, res in enumerate(results):
            if isinstance(res, self._redis.exceptions.NoScriptError):
                retry.append(i)
            elif isinstance(res, BaseException):
                raise res
        return retry

    # --- the miss in three round trips: lease + re-read, write + release -----------------------

    def _took_lease(self, vkey: str, token: str, data: Any) -> None:
        """The lease script took the lease and read ``data``: keep both for the flight's next calls."""
        now = time.monotonic()
        with self._plock:
            prefetched = self._prefetched
            while prefetched:  # oldest first: deadlines are in insertion order
                oldest = next(iter(prefetched))
                if prefetched[oldest][0] > now:
                    break
                del prefetched[oldest]  # never re-read (the flight took another path): forget it
            prefetched[vkey] = (now + _PREFETCH_LIFE, data)
            _remember(self._held, vkey, token)

    def _prefetch(self, vkey: str) -> Any:
        """What the lease script read for ``vkey`` just before (consumed), or ``_NOT_READ``."""
        with self._plock:
            item = self._prefetched.pop(vkey, None)
        if item is None or item[0] < time.monotonic():
            return _NOT_READ
        return item[1]

    def _write_token(self, vkey: str) -> str:
        """The token of a lease this process holds on ``vkey`` ('' if none): the write releases it."""
        if not self._held:
            return ""
        with self._plock:
            return self._held.pop(vkey, "")

    def _wrote(self, vkey: str, token: str, ok: bool) -> None:
        with self._plock:
            _remember(self._released if ok else self._held, vkey, token)

    def _release_needed(self, vkey: str, token: str) -> bool:
        """False when a write already released this lease (no round trip needed)."""
        with self._plock:
            if self._held.get(vkey) == token:
                del self._held[vkey]
            if self._released.get(vkey) == token:
                del self._released[vkey]
                return False
        return True

    def _lease_answer(self, vkey: str, token: str, reply: Any) -> str | None:
        if not int(reply[0]):
            return None
        self._took_lease(vkey, token, reply[1] if len(reply) > 1 else None)
        return token

    def _prefetched_many(self, names: Sequence[str]) -> tuple[list[Any], set[int]]:
        """For each name, what the lease script read (or ``_NOT_READ``), and the indexes found."""
        raw: list[Any] = [_NOT_READ] * len(names)
        found: set[int] = set()
        if self._prefetched:
            for i, name in enumerate(names):
                data = self._prefetch(name)
                if data is not _NOT_READ:
                    raw[i] = data
                    found.add(i)
        return raw, found

    def _type_error(self, key: str, exc: Exception) -> Entry | None:
        """A GET's error reply: WRONGTYPE is foreign data under our key (a counted corrupt miss)."""
        if str(exc).startswith("WRONGTYPE"):
            return self._decode(key, _FOREIGN)
        raise exc

    # --- Cluster: one node's failure is a partial failure ---------------------------------------
    #
    # Every single-key call goes to the node owning the key's slot. When that node fails (or is
    # skipped after failing _NODE_THRESHOLD times in a row, for _NODE_COOLDOWN seconds) while
    # another primary is healthy, the call raises NodeUnavailableError inside the tier; the public
    # method turns it into a miss / skipped write / lease-less load and reports an event. So the
    # core's tier-wide breaker never sees it, and the live slots keep their answers. When every
    # primary is failing, the error propagates and the core's breaker handles the outage.

    @staticmethod
    def _node_of(client: Any, name: str) -> str | None:
        try:
            node = client.get_node_from_key(name)
        except Exception:  # topology not known yet, slot not covered...
            return None
        return getattr(node, "name", None)

    def _partial(self, client: Any, node: str) -> bool:
        """Does another primary still answer (so ``node``'s failure costs only its own slots)?"""
        try:
            names = [n.name for n in client.get_primaries()]
        except Exception:
            return False
        return any(n != node and self._nodes.healthy(n) for n in names)

    def _node_error(self, client: Any, node: str | None, exc: Exception) -> NodeUnavailableError | None:
        """Count a failure of ``node``; the error to raise instead of ``exc`` if it is partial."""
        if not _node_level(exc):
            return None
        if node is None:
            node = getattr(getattr(exc, "connection", None), "name", None)
            if node is None:
                return None
        self._nodes.failed(node)
        if self._nodes.failures.get(node) == _NODE_THRESHOLD:
            logger.warning(
                "Redis tier %r (%s): Cluster node %s failed %d times in a row (%s); "
                "its slots are skipped for %.1fs at a time while it fails",
                self.name,
                self._target(),
                node,
                _NODE_THRESHOLD,
                _describe(exc),
                _NODE_COOLDOWN,
            )
        return NodeUnavailableError(node, exc) if self._partial(client, node) else None

    def _node_skipped(self, client: Any, node: str | None) -> NodeUnavailableError | None:
        if node is not None and not self._nodes.allows(node) and self._partial(client, node):
            return NodeUnavailableError(node, None)
        return None

    def _guard(self, client: Any, name: str, call: Callable[[], Any], node: str | None = None) -> Any:
        node = node or self._node_of(client, name)
        skipped = self._node_skipped(client, node)
        if skipped is not None:
            raise skipped
        gate = self._sync_gate(node)
        if not gate.acquire(timeout=self._pool_timeout):
            raise self._redis.exceptions.ConnectionError(
                f"no Redis Cluster connection to {node} free within {self._pool_timeout:g} s"
            )
        try:
            result = call()
        except Exception as exc:
            down = self._node_error(client, node, exc)
            if down is None:
                raise
            raise down from exc
        finally:
            gate.release()
        if node is not None:
            self._nodes.ok(node)
        return result

    def _sync_gate(self, node: str | None) -> threading.BoundedSemaphore:
        """Threads in flight per node, at most max_connections: redis-py's sync Cluster client
        raises "Too many connections" instead of waiting."""
        gate = self._sync_gates.get(node)
        if gate is None:
            with self._lock:
                gate = self._sync_gates.setdefault(node, threading.BoundedSemaphore(self._node_gate_size))
        return gate

    async def _aguard(self, client: Any, name: str, call: Callable[[], Any], node: str | None = None) -> Any:
        node = node or self._node_of(client, name)
        skipped = self._node_skipped(client, node)
        if skipped is not None:
            raise skipped
        gates = self._state().gates
        gate = gates.get(node)
        if gate is None:
            gate = gates[node] = asyncio.Semaphore(self._node_gate_size)
        try:
            async with gate:  # queue (FIFO) for the node instead of failing when it is busy
                result = await call()
        except Exception as exc:
            down = self._node_error(client, node, exc)
            if down is None:
                raise
            raise down from exc
        if node is not None:
            self._nodes.ok(node)
        return result

    def _node_down(self, key: str, down: NodeUnavailableError) -> None:
        kind = EventKind.TIER_SKIPPED if down.cause is None else EventKind.TIER_ERROR
        self._on_event(Event(kind, key, tier=self.name, error=down))

    def _by_node(self, client: Any, names: Sequence[str]) -> dict[str, dict[int, list[int]]]:
        """Indexes of ``names`` grouped by the node owning them, then by slot."""
        groups: dict[str, dict[int, list[int]]] = {}
        for i, name in enumerate(names):
            slot = client.keyslot(name)
            node = client.nodes_manager.get_node_from_slot(slot).name
            groups.setdefault(node, {}).setdefault(slot, []).append(i)
        return groups

    def _node_batch_down(self, keys: Sequence[str], ids: Sequence[int], down: NodeUnavailableError) -> None:
        for i in ids:
            self._node_down(keys[i], down)

    # Batches on Cluster: one pipeline per node (an MGET per slot; EXISTS per missing key to
    # tell foreign types from absent keys), nodes in parallel on the async face. A failing node
    # costs only its keys: misses (reads) or skipped writes, reported as events.

    def _cluster_mget_sync(self, client: Any, names: list[str], keys: Sequence[str]) -> list[Any]:
        raw: list[Any] = [None] * len(names)
        for node, slots in self._by_node(client, names).items():

            def read(slots: dict[int, list[int]] = slots) -> list[list[Any]]:
                pipe = client.pipeline()
                for ids in slots.values():
                    pipe.execute_command("MGET", *(names[i] for i in ids))
                return list(pipe.execute())

            try:
                replies = self._guard(client, "", read, node)
                self._fill(raw, slots, replies)
                missing = [i for ids in slots.values() for i in ids if raw[i] is None]
                if missing:

                    def exists(missing: list[int] = missing) -> list[Any]:
                        pipe = client.pipeline()
                        for i in missing:
                            pipe.exists(names[i])
                        return list(pipe.execute())

                    self._mark_foreign(raw, missing, self._guard(client, "", exists, node))
            except NodeUnavailableError as down:
                self._node_batch_down(keys, [i for ids in slots.values() for i in ids], down)
        return raw

    async def _cluster_mget(self, client: Any, names: list[str], keys: Sequence[str]) -> list[Any]:
        await client.initialize()  # the async Cluster client learns its nodes on first use
        raw: list[Any] = [None] * len(names)

        async def one(node: str, slots: dict[int, list[int]]) -> None:
            async def read() -> list[Any]:
                pipe = client.pipeline()
                for ids in slots.values():
                    pipe.execute_command("MGET", *(names[i] for i in ids))
                return list(await pipe.execute())

            try:
                self._fill(raw, slots, await self._aguard(client, "", read, node))
                missing = [i for ids in slots.values() for i in ids if raw[i] is None]
                if missing:

                    async def exists() -> list[Any]:
                        pipe = client.pipeline()
                        for i in missing:
                            pipe.exists(names[i])
                        return list(await pipe.execute())

                    self._mark_foreign(raw, missing, await self._aguard(client, "", exists, node))
            except NodeUnavailableError as down:
                self._node_batch_down(keys, [i for ids in slots.values() for i in ids], down)

        await asyncio.gather(*(one(node, slots) for node, slots in self._by_node(client, names).items()))
        return raw

    @staticmethod
    def _fill(raw: list[Any], slots: dict[int, list[int]], replies: Sequence[Any]) -> None:
        for ids, reply in zip(slots.values(), replies, strict=True):
            for i, data in zip(ids, reply, strict=True):
                raw[i] = data

    @staticmethod
    def _mark_foreign(raw: list[Any], missing: Sequence[int], exists: Sequence[Any]) -> None:
        for i, there in zip(missing, exists, strict=True):
            if int(there):  # MGET said nil, but the key exists: another Redis type
                raw[i] = _FOREIGN

    def _cluster_set_many(self, client: Any, calls: list[tuple[Any, ...]], keys: Sequence[str]) -> None:
        body, sha = _SCRIPTS["set"]
        for node, slots in self._by_node(client, [c[0] for c in calls]).items():
            ids = [i for group in slots.values() for i in group]

            def write(ids: list[int] = ids) -> list[int]:
                pipe = client.pipeline()
                for i in ids:
                    pipe.execute_command("EVALSHA", sha, 2, *calls[i])
                results = pipe.execute(raise_on_error=False)
                for j in self._check_pipeline(results):
                    results[j] = client.eval(body, 2, *calls[ids[j]])  # the script cache was flushed
                return [i for i, res in zip(ids, results, strict=True) if res == 0]

            try:
                refused = self._guard(client, "", write, node)
                if self._signer() is not None:  # a refused write may sit behind a forged record
                    for i in refused:
                        self._fenced(client, "set", keys[i], calls[i])
            except NodeUnavailableError as down:
                self._node_batch_down(keys, ids, down)

    async def _acluster_set_many(
        self, client: Any, calls: list[tuple[Any, ...]], keys: Sequence[str]
    ) -> None:
        await client.initialize()
        body, sha = _SCRIPTS["set"]

        async def one(node: str, ids: list[int]) -> None:
            async def write() -> list[int]:
                pipe = client.pipeline()
                for i in ids:
                    pipe.execute_command("EVALSHA", sha, 2, *calls[i])
                results = await pipe.execute(raise_on_error=False)
                for j in self._check_pipeline(results):
                    results[j] = await client.eval(body, 2, *calls[ids[j]])
                return [i for i, res in zip(ids, results, strict=True) if res == 0]

            try:
                refused = await self._aguard(client, "", write, node)
                if self._signer() is not None:  # outside the node's gate: _afenced takes it itself
                    for i in refused:
                        await self._afenced(client, "set", keys[i], calls[i])
            except NodeUnavailableError as down:
                self._node_batch_down(keys, ids, down)

        groups = self._by_node(client, [c[0] for c in calls])
        await asyncio.gather(
            *(one(node, [i for group in slots.values() for i in group]) for node, slots in groups.items())
        )

    # --- the sync face ----------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        vkey = self._vkey(key)
        if self._prefetched:
            data = self._prefetch(vkey)
            if data is not _NOT_READ:
                return self._decode(key, data, report=False)
        client = self._sync_client()
        try:
            data = self._guard(client, vkey, lambda: client.get(vkey)) if self._cluster else client.get(vkey)
        except self._redis.exceptions.ResponseError as exc:
            return self._type_error(key, exc)
        except NodeUnavailableError as down:
            self._node_down(key, down)
            return None
        return self._decode(key, data)

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        if not keys:
            return []
        client = self._sync_client()
        names = [self._vkey(k) for k in keys]
        raw, reread = self._prefetched_many(names)
        ask = [n for n, d in zip(names, raw, strict=True) if d is _NOT_READ]
        if ask:
            if self._cluster:
                ask_keys = [k for k, d in zip(keys, raw, strict=True) if d is _NOT_READ]
                got = iter(self._cluster_mget_sync(client, ask, ask_keys))
            else:
                got = iter(self._mget_sync(client, ask))
            raw = [next(got) if d is _NOT_READ else d for d in raw]
        now = self._clock()
        return [
            self._decode(k, d, now, i not in reread) for i, (k, d) in enumerate(zip(keys, raw, strict=True))
        ]

    def _mget_sync(self, client: Any, names: list[str]) -> list[Any]:
        raw: list[Any] = list(client.mget(names))
        missing = [n for n, d in zip(names, raw, strict=True) if d is None]
        # MGET answers nil for a key of another type; one EXISTS (only when something was
        # missing) tells a foreign key from an absent one, so GET and MGET agree.
        if missing and int(client.exists(*missing)):
            pipe = client.pipeline(transaction=False)
            for name in missing:
                pipe.type(name)
            kinds = dict(zip(missing, pipe.execute(), strict=True))
            raw = [
                _FOREIGN if d is None and kinds.get(n) not in (None, b"none", "none") else d
                for n, d in zip(names, raw, strict=True)
            ]
        return raw

    def set(self, key: str, entry: Entry) -> bool:
        """Set-if-newer; False when a newer record (value or tombstone) kept its place."""
        args = self._set_args(key, entry, self._clock())
        if args is None:
            return True
        token = self._write_token(args[0])
        try:
            ok = self._fenced(self._sync_client(), "set", key, (*args[:-1], token))
        except NodeUnavailableError as down:
            self._node_down(key, down)
            if token:
                self._wrote(args[0], token, False)
            return True  # a skipped write (reported), not a newer record: L1 may keep the value
        except BaseException:
            if token:
                self._wrote(args[0], token, False)
            raise
        if token:
            self._wrote(args[0], token, True)  # the script releases the lease even when refused
        return ok

    def set_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        now = self._clock()
        pairs = [(k, a) for k, e in items if (a := self._set_args(k, e, now)) is not None]
        calls = [a for _, a in pairs]
        if not calls:
            return
        client = self._sync_client()
        if self._cluster:
            self._cluster_set_many(client, calls, [k for k, _ in pairs])
            return
        body, sha = _SCRIPTS["set"]
        pipe = client.pipeline(transaction=False)
        for args in calls:
            pipe.execute_command("EVALSHA", sha, 2, *args)
        results = pipe.execute(raise_on_error=False)
        for i in self._check_pipeline(results):
            results[i] = client.eval(body, 2, *calls[i])  # the script cache was flushed (e.g. a restart)
        if self._signer() is not None:
            for (k, args), res in zip(pairs, results, strict=True):
                if res == 0:
                    self._fenced(client, "set", k, args)

    def delete(self, key: str, version: int) -> None:
        try:
            self._fenced(self._sync_client(), "delete", key, self._delete_args(key, version))
        except NodeUnavailableError as down:
            self._node_down(key, down)

    def acquire_lease(self, key: str, ttl: float) -> str | None:
        token = secrets.token_hex(16)
        vkey = self._vkey(key)
        try:
            reply = self._eval(self._sync_client(), "lease", 2, vkey, vkey + ":lease", token, _ms(ttl))
        except NodeUnavailableError as down:
            self._node_down(key, down)
            return _NODE_DOWN_TOKEN
        except Exception:
            self._unsure_lease(key, token, ttl)
            raise
        return self._lease_answer(vkey, token, reply)

    # A SET NX that failed on our side (a timeout) may still run on the server later (a hung
    # Redis that comes back), leaving a lease nobody holds: other processes' waiters would sit
    # out their whole lease_wait. Its token is ours, so we delete it (compare-and-delete) when it
    # shows up: tries spaced out, doubling, until it is deleted or its TTL is over anyway.

    def _unsure_lease(self, key: str, token: str, ttl: float) -> None:
        vkey = self._vkey(key)
        args = (vkey + ":lease", token, self._channel, vkey)

        def sweep() -> None:
            deadline, pause = time.monotonic() + ttl, 0.05
            while time.monotonic() < deadline:
                try:
                    if self._eval(self._sync_client(), "release", 1, *args):
                        return
                except Exception:  # still unreachable: try again later
                    pass
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause *= 2

        threading.Thread(target=sweep, name="tiercache-lease-sweep", daemon=True).start()

    async def _aunsure_lease(self, key: str, token: str, ttl: float) -> None:
        vkey = self._vkey(key)
        args = (vkey + ":lease", token, self._channel, vkey)
        deadline, pause = time.monotonic() + ttl, 0.05
        while time.monotonic() < deadline:
            try:
                if await self._aeval(self._aclient(), "release", 1, *args):
                    return
            except Exception:
                pass
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause *= 2

    def release_lease(self, key: str, token: str) -> None:
        vkey = self._vkey(key)
        if token == _NODE_DOWN_TOKEN or not self._release_needed(vkey, token):
            return
        try:
            self._eval(self._sync_client(), "release", 1, vkey + ":lease", token, self._channel, vkey)
        except NodeUnavailableError as down:
            self._node_down(key, down)

    def extend_lease(self, key: str, token: str, ttl: float) -> bool:
        """Push the lease's expiry to ``ttl`` seconds from now; False if we no longer hold it."""
        if token == _NODE_DOWN_TOKEN:
            return True
        vkey = self._vkey(key)
        try:
            return bool(self._eval(self._sync_client(), "extend", 1, vkey + ":lease", token, _ms(ttl)))
        except NodeUnavailableError as down:
            self._node_down(key, down)
            return True  # keep loading: the lease is not the node's to judge now

    def _peek(self, key: str, vkey: str) -> tuple[Entry | None, int]:
        try:
            data, pttl = self._eval(self._sync_client(), "peek", 2, vkey, vkey + ":lease")
        except NodeUnavailableError as down:
            self._node_down(key, down)
            return None, -2  # nothing to wait for there
        return self._decode(key, data), int(pttl)

    def _sync_subscriber(self) -> _SyncSubscriber:
        with self._lock:
            sub = self._sync_sub
            if sub is None or sub.pid != os.getpid():  # a forked child has no subscriber thread
                sub = self._sync_sub = _SyncSubscriber(self)
            return sub

    def wait_for_entry(self, key: str, timeout: float) -> Entry | None:
        deadline = time.monotonic() + max(0.0, timeout)
        vkey = self._vkey(key)
        sub = self._sync_subscriber()
        woken = threading.Event()
        self._hub.add(vkey, woken.set)
        try:
            if not sub.ready.is_set():
                sub.ready.wait(min(self._ready_wait, max(0.0, deadline - time.monotonic())))
            waits = _Backoff()
            while True:
                subscribed = sub.ready.is_set()  # read before the peek: later wakes are not lost
                woken.clear()
                entry, lease_ms = self._peek(key, vkey)
                pause = self._next_pause(entry, lease_ms, subscribed, waits)
                remaining = deadline - time.monotonic()
                if pause is None or remaining <= 0:
                    return entry
                woken.wait(min(pause, remaining))
        finally:
            self._hub.remove(vkey, woken.set)

    @property
    def _ready_wait(self) -> float:
        """How long a first waiter lets the subscriber connect before falling back to polling."""
        return min(0.2, self.connect_timeout + 2 * self.socket_timeout)  # then poll, with backoff

    def _next_pause(
        self, entry: Entry | None, lease_ms: int, subscribed: bool, waits: _Backoff
    ) -> float | None:
        """How long to sleep before the next peek, or None to return ``entry`` now."""
        if entry is not None and entry.is_fresh(self._clock()):
            return None
        if lease_ms < 0:  # no lease (released, expired, never taken): nobody is loading
            return None
        if subscribed:
            # The holder's write or release wakes us; if it crashed, its lease runs out: look then.
            return lease_ms / 1000 + 0.002
        return waits.next()

    def close(self) -> None:
        with self._lock:
            sub, self._sync_sub = self._sync_sub, None
            client, self._sync = self._sync, None
            states = list(self._states.values())
            self._states.clear()
            self._last = None
        if sub is not None:
            sub.stop(wait=True)
        if client is not None and client is not self._user_sync:
            client.close()
        for state in states:
            self._drop_state(state)

    def _drop_state(self, state: _LoopState) -> None:
        loop = state.loop_ref()
        if loop is None or loop.is_closed() or state.closed:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop and state.keeper is not None:
            state.keeper.cancel()  # closes the client on this loop, soon
        # Otherwise the loop lives on elsewhere; its keeper closes the client when the loop ends.

    # --- coherence: expire, clear, tag times (sync) ------------------------------------------

    def expire(self, key: str, at: float, version: int) -> None:
        client = self._sync_client()
        try:
            if self._signer() is not None:
                try:
                    old = client.get(self._vkey(key))
                except self._redis.exceptions.ResponseError:  # another Redis type: nothing to expire
                    return
                args = self._signed_expire_args(key, old, at, version)
                if args is not None:
                    self._eval(client, "replace", 1, *args)
                return
            self._eval(client, "expire", 1, *self._expire_args(key, at, version))
        except NodeUnavailableError as down:
            self._node_down(key, down)

    def clear(self, prefix: str) -> int:
        client = self._sync_client()
        pattern, scan_prefix = self._clear_pattern(prefix)
        removed = 0
        for node in self._primaries(client):
            cursor = 0
            while True:
                if node is None:
                    cursor, names = client.scan(cursor=cursor, match=pattern, count=_SCAN_COUNT)
                else:
                    cursors, names = client.scan(
                        cursor=cursor, match=pattern, count=_SCAN_COUNT, target_nodes=node
                    )
                    cursor = cursors[node.name]
                doomed, unsure = self._sort_for_clear(names, prefix, scan_prefix)
                if unsure:
                    raw = client.mget_nonatomic(unsure) if self._cluster else client.mget(unsure)
                    doomed += self._belonging(unsure, raw, prefix)
                if doomed:
                    if self._cluster:
                        pipe = client.pipeline()
                        for name in doomed:
                            pipe.execute_command("UNLINK", name)  # one key: one slot
                        removed += sum(int(n) for n in pipe.execute())
                    else:
                        removed += int(client.unlink(*doomed))
                if int(cursor) == 0:
                    break
        return removed

    def get_tag_times(self, tags: Sequence[str]) -> list[float | None]:
        if not tags:
            return []
        raw = self._sync_client().hmget(self._tags_key, list(tags))
        return [self._tag_time(tag, r) for tag, r in zip(tags, raw, strict=True)]

    def set_tag_times(self, tags: Sequence[str], at: float) -> None:
        if tags:
            self._eval(self._sync_client(), "tags", 1, self._tags_key, *self._tag_args(tags, at))

    def _primaries(self, client: Any) -> list[Any]:
        """The nodes a SCAN must visit: every primary on Cluster, else [None] (the one server)."""
        return list(client.get_primaries()) if self._cluster else [None]

    def _expire_args(self, key: str, at: float, version: int) -> tuple[Any, ...]:
        return (self._vkey(key), _version_bytes(version), _time_field(at))

    def _clear_pattern(self, prefix: str) -> tuple[str, str]:
        """The MATCH pattern for ``clear(prefix)`` and the literal start of key it matches.

        Every name of a key starting with ``prefix`` starts with the key's first ``_readable`` bytes
        before any ``}`` (see ``_vkey``), so the pattern uses at most that much of the prefix.
        """
        if not prefix:
            raise ValueError("RedisTier.clear needs a non-empty prefix (it never clears everything)")
        start = prefix.split("}", 1)[0].encode("utf-8", "surrogatepass")[: self._readable]
        scan_prefix = start.decode("utf-8", "ignore")
        return f"{_glob_escape(self.prefix)}:{{{_glob_escape(scan_prefix)}*", scan_prefix

    def _sort_for_clear(
        self, names: Sequence[Any], prefix: str, scan_prefix: str
    ) -> tuple[list[str], list[str]]:
        """Value keys among ``names``: those surely under ``prefix``, and those to check by reading.

        Leases (``...}:lease``) are skipped. A name is sure when its readable start (the name up to
        a ``#h:``/``#b:`` hash marker, or all of it) starts with ``prefix``; when the prefix was cut
        for the pattern, hashed names may belong to another namespace and are read first.
        """
        head = len(self.prefix) + 2
        sure: list[str] = []
        unsure: list[str] = []
        for raw in names:
            vkey = _text(raw)
            if not vkey.endswith("}"):
                continue  # a lease (or a foreign key shaped like ours): not a value key
            name = vkey[head:-1]
            readable = name
            for marker in ("#h:", "#b:"):
                cut = name.rfind(marker)
                if cut >= 0:
                    readable = name[:cut]
                    break
            if readable.startswith(prefix):
                sure.append(vkey)
            elif scan_prefix != prefix or readable != name:
                unsure.append(vkey)
        return sure, unsure

    def _belonging(self, names: Sequence[str], raw: Sequence[Any], prefix: str) -> list[str]:
        """The names whose record's entry key starts with ``prefix`` (tombstones cannot tell: kept)."""
        out = []
        for name, data in zip(names, raw, strict=True):
            if not isinstance(data, bytes) or data[:3] != _MAGIC:
                continue
            start = _EXPIRED_HEADER_LEN if data[3:4] == _EXPIRED else _HEADER_LEN
            try:
                entry = self._codec.loads(data[start:])
            except Exception:  # not ours to judge: leave it
                continue
            if entry.key.startswith(prefix):
                out.append(name)
        return out

    def _tag_time(self, tag: str, raw: Any) -> float | None:
        # Validated and, with a SignedCodec, authenticated: an untrusted time counts as "now".
        at, problem = unseal_tag_time(self._codec, self._tags_key, tag, raw, self._clock())
        if problem is not None:
            self._corrupt(f"tag:{tag}", problem)
        return at

    def _tag_args(self, tags: Sequence[str], at: float) -> list[Any]:
        """The tag script's arguments: the time, the latest plausible time, (tag, stored) pairs."""
        args: list[Any] = [_time_arg(at), _time_arg(max(at, self._clock()) + MAX_SKEW)]
        for tag in tags:
            args += (tag, seal_tag_time(self._codec, self._tags_key, tag, at))
        return args

    def _subscriber_client(self, index: int, node: Any = None) -> Any:
        """A new sync client for one pub/sub connection (``RedisBus``): RESP2, this tier's settings.

        On Cluster it connects to node ``index`` (modulo the node count) of the current topology;
        classic pub/sub reaches every node, so any node will do and a failed one is skipped.
        """
        from redis.retry import Retry

        redis = self._redis
        kwargs = self._conn_kwargs(Retry)
        kwargs["protocol"] = 2  # RESP3 would deliver messages as pushes a RESP2 listener never sees
        if self._sentinels is not None:
            from redis.sentinel import Sentinel as SyncSentinel

            sentinel_cls: Any = SyncSentinel
            sentinel = sentinel_cls(self._sentinels, sentinel_kwargs=self._sentinel_kwargs, **kwargs)
            return sentinel.master_for(self._service_name, max_connections=2, **kwargs)
        if self._cluster:
            if node is None:  # (RedisBus passes the node that carries its channel)
                nodes = list(self._sync_client().get_nodes())
                if not nodes:
                    raise redis.ConnectionError("no Redis Cluster node known")
                node = nodes[index % len(nodes)]
            accepted = inspect.signature(redis.Redis.__init__).parameters
            pool_kwargs = node.redis_connection.connection_pool.connection_kwargs
            ckw = {k: v for k, v in pool_kwargs.items() if k in accepted}  # credentials, TLS, ...
            ckw.update(kwargs)
            ckw.update(host=node.host, port=node.port)
            return redis.Redis(**ckw)
        if self._url is not None:
            return redis.Redis.from_url(self._url, **kwargs)
        user = self._user_sync
        if user is None:
            raise ConfigurationError("RedisBus needs a tier with url=, sentinels= or a sync client=")
        pool = user.connection_pool
        ckw = dict(pool.connection_kwargs)
        ckw.update(kwargs)
        pool = redis.ConnectionPool(connection_class=pool.connection_class, **ckw)
        return redis.Redis(connection_pool=pool)

    # --- the async face ---------------------------------------------------------------------

    async def aget(self, key: str) -> Entry | None:
        vkey = self._vkey(key)
        if self._prefetched:
            data = self._prefetch(vkey)
            if data is not _NOT_READ:
                return self._decode(key, data, report=False)
        pool = self._state().pool if self._user_async is None else None
        if pool is None:
            client = self._aclient()
            try:
                data = await (
                    self._aguard(client, vkey, lambda: client.get(vkey))
                    if self._cluster
                    else client.get(vkey)
                )
            except self._redis.exceptions.ResponseError as exc:
                return self._type_error(key, exc)
            except NodeUnavailableError as down:
                self._node_down(key, down)
                return None
            return self._decode(key, data)
        # GET through a connection of the tier's own pool, without redis-py's per-command layers
        # (the retry wrapper, redis-py's own operation metrics): a few dozen Python calls fewer
        # per L2 hit. The read path never retries anyway (see Failure policy), and a failed or
        # cancelled read drops its connection, whose reply may still be on the wire (redis-py
        # does too). Needs redis-py >= 5.3 (``get_connection()`` without a command name; the floor is 6.2).
        try:
            data = await _lean_call(pool, "GET", vkey)
        except self._redis.exceptions.ResponseError as exc:
            return self._type_error(key, exc)
        return self._decode(key, data)

    async def aget_many(self, keys: Sequence[str]) -> list[Entry | None]:
        if not keys:
            return []
        names = [self._vkey(k) for k in keys]
        raw, reread = self._prefetched_many(names)
        ask = [n for n, d in zip(names, raw, strict=True) if d is _NOT_READ]
        if ask:
            if self._cluster:
                ask_keys = [k for k, d in zip(keys, raw, strict=True) if d is _NOT_READ]
                got = iter(await self._cluster_mget(self._aclient(), ask, ask_keys))
            else:
                got = iter(await self._amget(self._aclient(), ask))
            raw = [next(got) if d is _NOT_READ else d for d in raw]
        now = self._clock()
        return [
            self._decode(k, d, now, i not in reread) for i, (k, d) in enumerate(zip(keys, raw, strict=True))
        ]

    async def _amget(self, client: Any, names: list[str]) -> list[Any]:
        pool = self._state().pool if self._user_async is None else None
        if pool is not None:
            raw: list[Any] = list(await _lean_call(pool, "MGET", *names))
        else:
            raw = list(await client.mget(names))
        missing = [n for n, d in zip(names, raw, strict=True) if d is None]
        if not missing:
            return raw
        exists = await (_lean_call(pool, "EXISTS", *missing) if pool is not None else client.exists(*missing))
        if int(exists):  # see _mget_sync
            pipe = client.pipeline(transaction=False)
            for name in missing:
                pipe.type(name)
            kinds = dict(zip(missing, await pipe.execute(), strict=True))
            raw = [
                _FOREIGN if d is None and kinds.get(n) not in (None, b"none", "none") else d
                for n, d in zip(names, raw, strict=True)
            ]
        return raw

    async def aset(self, key: str, entry: Entry) -> bool:
        args = self._set_args(key, entry, self._clock())
        if args is None:
            return True
        token = self._write_token(args[0])
        try:
            ok = await self._afenced(self._aclient(), "set", key, (*args[:-1], token))
        except NodeUnavailableError as down:
            self._node_down(key, down)
            if token:
                self._wrote(args[0], token, False)
            return True  # a skipped write (reported), not a newer record: L1 may keep the value
        except BaseException:
            if token:
                self._wrote(args[0], token, False)
            raise
        if token:
            self._wrote(args[0], token, True)  # the script releases the lease even when refused
        return ok

    async def aset_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        now = self._clock()
        pairs = [(k, a) for k, e in items if (a := self._set_args(k, e, now)) is not None]
        calls = [a for _, a in pairs]
        if not calls:
            return
        client = self._aclient()
        if self._cluster:
            await self._acluster_set_many(client, calls, [k for k, _ in pairs])
            return
        body, sha = _SCRIPTS["set"]
        pipe = client.pipeline(transaction=False)
        for args in calls:
            pipe.execute_command("EVALSHA", sha, 2, *args)
        results = await pipe.execute(raise_on_error=False)
        for i in self._check_pipeline(results):
            results[i] = await client.eval(body, 2, *calls[i])
        if self._signer() is not None:
            for (k, args), res in zip(pairs, results, strict=True):
                if res == 0:
                    await self._afenced(client, "set", k, args)

    async def adelete(self, key: str, version: int) -> None:
        try:
            await self._afenced(self._aclient(), "delete", key, self._delete_args(key, version))
        except NodeUnavailableError as down:
            self._node_down(key, down)

    async def aacquire_lease(self, key: str, ttl: float) -> str | None:
        token = secrets.token_hex(16)
        vkey = self._vkey(key)
        try:
            reply = await self._aeval(self._aclient(), "lease", 2, vkey, vkey + ":lease", token, _ms(ttl))
        except NodeUnavailableError as down:
            self._node_down(key, down)
            return _NODE_DOWN_TOKEN
        except Exception:
            sweep = asyncio.get_running_loop().create_task(self._aunsure_lease(key, token, ttl))
            self._sweeps.add(sweep)  # referenced until done
            sweep.add_done_callback(self._sweeps.discard)
            raise
        return self._lease_answer(vkey, token, reply)

    async def arelease_lease(self, key: str, token: str) -> None:
        vkey = self._vkey(key)
        if token == _NODE_DOWN_TOKEN or not self._release_needed(vkey, token):
            return
        try:
            await self._aeval(self._aclient(), "release", 1, vkey + ":lease", token, self._channel, vkey)
        except NodeUnavailableError as down:
            self._node_down(key, down)

    async def aextend_lease(self, key: str, token: str, ttl: float) -> bool:
        if token == _NODE_DOWN_TOKEN:
            return True
        vkey = self._vkey(key)
        try:
            return bool(await self._aeval(self._aclient(), "extend", 1, vkey + ":lease", token, _ms(ttl)))
        except NodeUnavailableError as down:
            self._node_down(key, down)
            return True

    async def _apeek(self, key: str, vkey: str) -> tuple[Entry | None, int]:
        try:
            data, pttl = await self._aeval(self._aclient(), "peek", 2, vkey, vkey + ":lease")
        except NodeUnavailableError as down:
            self._node_down(key, down)
            return None, -2
        return self._decode(key, data), int(pttl)

    def _async_subscriber(self) -> _LoopState:
        state = self._state()
        if state.subscriber is None or state.subscriber.done():
            state.subscriber = asyncio.get_running_loop().create_task(self._subscribe(state))
        return state

    async def _subscribe(self, state: _LoopState) -> None:
        """This loop's subscriber: one pub/sub connection multiplexing every waiting key."""
        backoff = 0.05
        while not state.closed:
            pubsub = None
            try:
                pubsub = state.client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self._channel)
                state.ready.set()
                self._hub.notify_all()
                backoff = 0.05
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if msg is not None and msg.get("type") == "message":
                        self._hub.notify(_text(msg["data"]))
            except asyncio.CancelledError:
                state.ready.clear()
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                raise
            except Exception:  # connection lost or refused: tell waiters, retry later
                state.ready.clear()
                self._hub.notify_all()
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 2.0)

    async def await_for_entry(self, key: str, timeout: float) -> Entry | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        vkey = self._vkey(key)
        state = self._async_subscriber()
        woken = asyncio.Event()

        def wake() -> None:  # called from this loop's subscriber, or another thread's
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(woken.set)

        self._hub.add(vkey, wake)
        try:
            if not state.ready.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        state.ready.wait(), min(self._ready_wait, max(0.0, deadline - loop.time()))
                    )
            waits = _Backoff()
            while True:
                subscribed = state.ready.is_set()  # read before the peek: later wakes are not lost
                woken.clear()
                entry, lease_ms = await self._apeek(key, vkey)
                pause = self._next_pause(entry, lease_ms, subscribed, waits)
                remaining = deadline - loop.time()
                if pause is None or remaining <= 0:
                    return entry
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(pause, remaining))
        finally:
            self._hub.remove(vkey, wake)

    # --- coherence: expire, clear, tag times (async) -----------------------------------------

    async def aexpire(self, key: str, at: float, version: int) -> None:
        client = self._aclient()
        try:
            if self._signer() is not None:
                try:
                    old = await client.get(self._vkey(key))
                except self._redis.exceptions.ResponseError:  # another Redis type: nothing to expire
                    return
                args = self._signed_expire_args(key, old, at, version)
                if args is not None:
                    await self._aeval(client, "replace", 1, *args)
                return
            await self._aeval(client, "expire", 1, *self._expire_args(key, at, version))
        except NodeUnavailableError as down:
            self._node_down(key, down)

    async def aclear(self, prefix: str) -> int:
        client = self._aclient()
        pattern, scan_prefix = self._clear_pattern(prefix)
        if self._cluster:
            await client.initialize()  # the async Cluster client learns its nodes on first use
        removed = 0
        for node in self._primaries(client):
            cursor = 0
            while True:
                if node is None:
                    cursor, names = await client.scan(cursor=cursor, match=pattern, count=_SCAN_COUNT)
                else:
                    cursors, names = await client.scan(
                        cursor=cursor, match=pattern, count=_SCAN_COUNT, target_nodes=node
                    )
                    cursor = cursors[node.name]
                doomed, unsure = self._sort_for_clear(names, prefix, scan_prefix)
                if unsure:
                    raw = await (client.mget_nonatomic(unsure) if self._cluster else client.mget(unsure))
                    doomed += self._belonging(unsure, raw, prefix)
                if doomed:
                    if self._cluster:
                        pipe = client.pipeline()
                        for name in doomed:
                            pipe.execute_command("UNLINK", name)  # one key: one slot
                        removed += sum(int(n) for n in await pipe.execute())
                    else:
                        removed += int(await client.unlink(*doomed))
                if int(cursor) == 0:
                    break
        return removed

    async def aget_tag_times(self, tags: Sequence[str]) -> list[float | None]:
        if not tags:
            return []
        raw = await self._aclient().hmget(self._tags_key, list(tags))
        return [self._tag_time(tag, r) for tag, r in zip(tags, raw, strict=True)]

    async def aset_tag_times(self, tags: Sequence[str], at: float) -> None:
        if tags:
            await self._aeval(self._aclient(), "tags", 1, self._tags_key, *self._tag_args(tags, at))

    async def aclose(self) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            state = self._states.pop(loop, None) if loop is not None else None
            if self._last is state:
                self._last = None
        if state is not None:
            if state.keeper is not None:
                state.keeper.cancel()
            await self._close_state(state)
        with self._lock:
            sub, self._sync_sub = self._sync_sub, None
            client, self._sync = self._sync, None
        if sub is not None:
            sub.stop(wait=False)  # the thread notices within its 0.2 s read timeout
        if client is not None and client is not self._user_sync:
            client.close()


_POOL_CLASS: Any = None


def _async_pool_class() -> Any:
    """The tier's asyncio pool: bounded, with a FIFO of waiters when exhausted, and a lean
    checkout. Built on first use (redis is imported lazily).

    Waiters: each waiter is one future in a queue; a released connection is handed to the oldest
    waiter directly (one wake per release, in order), and a newcomer queues behind waiters
    instead of taking a connection from under them. The wait's timeout is a timer on the loop
    (no task per wait). A waiter cancelled just after being handed a connection passes it on.

    Checkout: measured on loopback, where a GET takes about 100 µs, redis-py 8's pool spends about
    8 µs per checkout and release, mostly on connection-count metrics, plus a lock and an event for
    credential providers; its BlockingConnectionPool adds a Condition and a timer. This pool keeps
    what the tier needs: take a free connection and check it as redis-py does (connect it if new,
    reconnect it if the server closed it), give it back (dropping it if the server asked to
    reconnect). It does not dispatch redis-py's release event, so credential providers that
    re-authenticate on release, and RESP3 maintenance notifications, need your own client
    (``RedisTier(client=..., async_client=...)``).
    """
    global _POOL_CLASS
    if _POOL_CLASS is not None:
        return _POOL_CLASS
    from collections import deque

    from redis.asyncio import ConnectionPool
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    class BoundedPool(ConnectionPool):
        wait_timeout: float = DEFAULT_POOL_TIMEOUT
        read_limit: float = 0.25  # the tier's socket_timeout, for replies read on the lean path
        connect_limit: float = 0.25  # the tier's connect_timeout
        tier_ref: Callable[[], RedisTier | None] = staticmethod(lambda: None)
        tier_down = False
        # Invariant: a future in the queue is either pending (its waiter waits) or done (then
        # skipped); a connection is never both available and handed out.
        _waiters: deque[tuple[float, asyncio.Future[Any]]] | None = None
        _wait_timer: asyncio.TimerHandle | None = None
        _watch: asyncio.TimerHandle | None = None
        _reads: dict[Any, _Read]

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._reads = {}

        async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
            waiters = self._waiters
            while waiters and waiters[0][1].done():  # cancelled waiters do not hold the line
                waiters.popleft()
            if waiters or not self.can_get_connection():
                connection = await self._wait_in_line()
            else:
                # No await between the check and the take: nobody else on this loop can take it.
                connection = self.get_available_connection()  # type: ignore[no-untyped-call]
            try:
                # redis-py's own check: connect if needed, and reconnect a connection the server
                # closed while it sat idle (restart, CLIENT KILL, idle timeout) or one with bytes
                # waiting, instead of failing the next command on it. A new connection's connect
                # is bounded lag-tolerantly (see _within; redis-py's own bound is the hard limit).
                if connection.is_connected:
                    await self.ensure_connection(connection)
                else:
                    await _within(
                        self.ensure_connection(connection), self.connect_limit, what="connecting to"
                    )
            except BaseException as exc:
                await _drop(connection)  # a connect cut short must not look connected to the next user
                await self.release(connection)
                if isinstance(exc, RedisTimeoutError) and self._in_use_connections:
                    # A new connection timed out while others are in use and answering: a busy
                    # process, not a dead server. Queue for one of them instead of failing.
                    return await self._connected_from_line()
                _report_connect(self, exc)
                raise
            if self.tier_down:
                _report_connect(self, None)
            return connection

        async def _connected_from_line(self) -> Any:
            connection = await self._wait_in_line()
            try:
                if connection.is_connected:
                    await self.ensure_connection(connection)
                else:
                    await _within(
                        self.ensure_connection(connection), self.connect_limit, what="connecting to"
                    )
            except BaseException as exc:
                await _drop(connection)
                await self.release(connection)
                _report_connect(self, exc)
                raise
            return connection

        async def _wait_in_line(self) -> Any:
            loop = asyncio.get_running_loop()
            waiters = self._waiters
            if waiters is None:
                waiters = self._waiters = deque()
            future: asyncio.Future[Any] = loop.create_future()
            # Every waiter waits wait_timeout, so deadlines are in queue order: one timer, for the
            # oldest waiter, expires them all in turn (no timer per wait).
            waiters.append((loop.time() + self.wait_timeout, future))
            if self._wait_timer is None:
                self._arm_wait_timer(loop)
            try:
                return await future
            except BaseException:
                if future.done() and not future.cancelled() and future.exception() is None:
                    # Handed a connection, then cancelled before resuming: pass it on.
                    self._in_use_connections.discard(future.result())
                    self._hand_on(future.result())
                raise  # a cancelled future left in the queue is skipped (it is done)

        def _arm_wait_timer(self, loop: asyncio.AbstractEventLoop) -> None:
            waiters = self._waiters
            while waiters and waiters[0][1].done():
                waiters.popleft()
            self._wait_timer = loop.call_at(waiters[0][0], self._expire_waiters, loop) if waiters else None

        def _expire_waiters(self, loop: asyncio.AbstractEventLoop) -> None:
            waiters = self._waiters
            now = loop.time()
            while waiters and (waiters[0][1].done() or waiters[0][0] <= now):
                _, future = waiters.popleft()
                if not future.done():
                    future.set_exception(
                        RedisConnectionError(
                            f"no Redis connection free within the pool timeout ({self.wait_timeout:g} s)"
                        )
                    )
            self._arm_wait_timer(loop)

        def _hand_on(self, connection: Any) -> None:
            """Give ``connection`` to the oldest waiter still waiting, or back to the free list."""
            waiters = self._waiters
            while waiters:
                _, future = waiters.popleft()
                if not future.done():
                    self._in_use_connections.add(connection)
                    future.set_result(connection)
                    return
            self._available_connections.append(connection)

        async def read_reply(self, conn: Any) -> Any:
            """The reply to the command just sent on ``conn``, within read_limit of the server's
            time (lag-tolerant, as ``_within``), watched by one timer per pool, not one per read."""
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            read = _Read(task, loop.time(), conn)
            self._reads[conn] = read
            if self._watch is None:
                due = loop.time() + self.read_limit / 4
                self._watch = loop.call_at(due, self._sweep, loop, due)
            try:
                return await conn.read_response(timeout=math.inf)
            except asyncio.CancelledError:
                if read.expired and (not hasattr(task, "uncancel") or task.uncancel() <= read.cancelling):
                    raise RedisTimeoutError(f"Timeout reading from {conn.host}:{conn.port}") from None
                raise
            finally:
                self._reads.pop(conn, None)

        def _sweep(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
            """Every read_limit / 4 while reads are in flight: end those past read_limit, unless the
            loop was too busy to tell (this timer ran late) or their reply has arrived."""
            now = loop.time()
            limit = self.read_limit
            late = now - due > limit / 4
            for read in list(self._reads.values()):
                waited = now - read.started
                if waited < limit or read.expired:
                    continue
                if waited < _HARD_LIMIT * limit:
                    if late:
                        continue
                    if read.arrivals < 2 and _bytes_waiting(read.conn):
                        read.arrivals += 1
                        continue
                read.expired = True
                read.task.cancel()
            if self._reads:
                due = now + limit / 4
                self._watch = loop.call_at(due, self._sweep, loop, due)
            else:
                self._watch = None

        async def release(self, connection: Any) -> None:
            try:
                self._in_use_connections.remove(connection)
            except KeyError:  # released twice (or never ours): never hand one connection out twice
                return
            reconnect = getattr(connection, "should_reconnect", None)
            if reconnect is not None and reconnect():
                with contextlib.suppress(Exception):
                    await connection.disconnect()
            self._hand_on(connection)

    _POOL_CLASS = BoundedPool
    return BoundedPool


async def _lean_call(pool: Any, *args: Any) -> Any:
    """One command on a connection of the tier's own pool, without redis-py's per-command layers
    (the retry wrapper, its operation metrics, response callbacks: the tier parses raw replies).
    An error reply raises ResponseError and keeps the connection; any other failure, or a
    cancellation, drops the connection, whose reply may still be on the wire (redis-py does too)."""
    from redis.exceptions import ResponseError

    conn = await pool.get_connection()
    try:
        await conn.send_command(*args)
        return await pool.read_reply(conn)
    except ResponseError:
        raise
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


_HARD_LIMIT = 20  # a lag-tolerant wait ends after this many times its limit, whatever the loop does


class _Read:
    """A read in flight on the lean path (see BoundedPool.read_reply)."""

    __slots__ = ("arrivals", "cancelling", "conn", "expired", "started", "task")

    def __init__(self, task: asyncio.Task[Any], started: float, conn: Any) -> None:
        self.task = task
        self.started = started
        self.conn = conn
        self.expired = False
        self.arrivals = 0
        self.cancelling = task.cancelling() if hasattr(task, "cancelling") else 0


def _bytes_waiting(conn: Any) -> bool:
    """Has the reply (or part of it) reached ``conn``'s stream buffer, unread?"""
    return bool(getattr(getattr(conn, "_reader", None), "_buffer", None))


async def _within(awaitable: Any, limit: float, conn: Any = None, what: str = "reading from") -> Any:
    """``awaitable`` (a connect, on the tier's pool), failing with redis-py's TimeoutError after
    ``limit`` seconds -- of the *server's* time, not of our event loop's congestion. Reads use the
    same rule with one timer per pool (``BoundedPool.read_reply``).

    A burst of a thousand tasks can hold the loop for hundreds of milliseconds in one iteration
    (measured: up to 560 ms on a loaded 2-core machine); a plain timer then fires on replies that
    arrived long ago but were not read yet. So the wait ends only when its timer fires *on time*
    (within a quarter of the limit) with nothing received: a timer that ran late says the loop was
    too busy to tell, and bytes already buffered on ``conn`` say the server did answer (allowed
    twice, so a reply cut short still ends); either way the timer is set again, ``limit / 2``
    later. Whatever the loop does, the wait ends after ``_HARD_LIMIT * limit``. No task is
    created: one timer on the loop.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    started = loop.time()
    cancelling = task.cancelling() if hasattr(task, "cancelling") else 0
    expired = False
    arrivals = 0
    handle: asyncio.TimerHandle

    def check(due: float) -> None:
        nonlocal handle, expired, arrivals
        now = loop.time()
        if now - started < _HARD_LIMIT * limit:
            late = now - due > limit / 4
            arrived = not late and arrivals < 2 and _bytes_waiting(conn)
            if late or arrived:
                arrivals += arrived
                handle = loop.call_at(now + limit / 2, check, now + limit / 2)
                return
        expired = True
        task.cancel()

    handle = loop.call_at(started + limit, check, started + limit)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if expired and (not hasattr(task, "uncancel") or task.uncancel() <= cancelling):
            from redis.exceptions import TimeoutError as RedisTimeoutError

            where = "the server"
            if conn is not None:
                where = f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')}"
            raise RedisTimeoutError(f"Timeout {what} {where}") from None
        raise
    finally:
        handle.cancel()


_LEAN_CONNECTIONS: dict[type, type] = {}


def _lean_connection_class(base: type) -> type:
    """``base`` (redis-py's Connection, SSLConnection...) sending without a task per command.

    redis-py bounds each send with ``asyncio.wait_for``, which on Python < 3.12 starts a Task per
    command. A send into an empty transport buffer never waits (the kernel takes it, or asyncio
    buffers it), so this class writes it directly; the reply's read, bounded by socket_timeout,
    still bounds the operation. Anything else (a fuller buffer, a health check due, a connection
    to open) takes redis-py's own path.
    """
    cls = _LEAN_CONNECTIONS.get(base)
    if cls is not None:
        return cls

    class LeanConnection(base):  # type: ignore[misc]
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            writer = getattr(self, "_writer", None)
            if (
                writer is not None
                and not self.health_check_interval
                and not writer.transport.is_closing()
                and not writer.transport.get_write_buffer_size()
            ):
                if isinstance(command, str):
                    command = command.encode()
                writer.writelines([command] if isinstance(command, bytes) else command)
                return
            await super().send_packed_command(command, check_health)

    LeanConnection.__name__ = LeanConnection.__qualname__ = f"Lean{base.__name__}"
    _LEAN_CONNECTIONS[base] = LeanConnection
    return LeanConnection


async def _drop(connection: Any) -> None:
    """Close ``connection`` (whatever state a failed or cancelled connect left it in)."""
    with contextlib.suppress(Exception):
        await connection.disconnect(nowait=True)


def _report_connect(pool: Any, exc: BaseException | None) -> None:
    """Tell the pool's tier that connecting failed (``exc``) or works again (None)."""
    if exc is not None and not isinstance(exc, Exception):
        return  # cancelled: not the server's fault
    tier = pool.tier_ref()
    pool.tier_down = exc is not None
    if tier is not None:
        if exc is None:
            tier._connected()
        else:
            tier._connect_failed(exc)


_SYNC_POOL_CLASS: Any = None


def _sync_pool_class() -> Any:
    """The sync face's pool: redis-py's BlockingConnectionPool, reporting connect failures to the tier."""
    global _SYNC_POOL_CLASS
    if _SYNC_POOL_CLASS is not None:
        return _SYNC_POOL_CLASS
    from redis import BlockingConnectionPool

    class ReportingPool(BlockingConnectionPool):
        tier_ref: Callable[[], RedisTier | None] = staticmethod(lambda: None)
        tier_down = False

        def get_connection(self, *args: Any, **kwargs: Any) -> Any:
            try:
                connection = super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
            except Exception as exc:
                _report_connect(self, exc)
                raise
            if self.tier_down:
                _report_connect(self, None)
            return connection

    _SYNC_POOL_CLASS = ReportingPool
    return ReportingPool


class _Backoff:
    """Jittered exponential pauses for polling while no subscriber is connected: 10 ms to 100 ms."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0.01

    def next(self) -> float:
        pause = self._next * random.uniform(0.5, 1.0)
        self._next = min(self._next * 2, 0.1)
        return pause


# --- compare-and-set: read-modify-write of one key, atomic across processes -----------------
# Used by tiercache.contrib.django for add/incr/decr/touch. ``read_for_update`` returns the live
# entry (or None) and a *token*: the record's first 24 bytes (its header: kind and version), or
# b"" when the key does not exist. ``compare_and_set`` writes a new record only if the stored
# header is still exactly that token, in one script, so no other write (set, delete, expire,
# clear, another compare_and_set) can fall between the read and the write.

# KEYS: value, lease. ARGV: token, record, ttl ms, wake channel, value key. 1 = written, 0 = changed.
# A key of another Redis type reads as absent (token b""), as GET does (a corrupt miss): the write
# replaces it.
_LUA_CAS = """
local h = redis.pcall('GETRANGE', KEYS[1], 0, 23)
if type(h) == 'table' then h = '' end
if h ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""
_SCRIPTS["cas"] = (_LUA_CAS, _sha(_LUA_CAS))


def _cas_args(tier: RedisTier, key: str, token: bytes, entry: Entry) -> tuple[Any, ...] | None:
    encoded = tier._encode(entry, tier._clock())
    if encoded is None:
        return None
    record, ttl_ms = encoded
    vkey = tier._vkey(key)
    return (vkey, vkey + ":lease", token, record, ttl_ms, tier._channel, vkey)


def read_for_update(tier: RedisTier, key: str) -> tuple[Entry | None, bytes]:
    """The live entry for ``key`` (or None) and the token ``compare_and_set`` expects."""
    try:
        data = tier._sync_client().get(tier._vkey(key))
    except tier._redis.exceptions.ResponseError as exc:  # WRONGTYPE: foreign data, a corrupt miss
        return tier._type_error(key, exc), b""
    return tier._decode(key, data), (bytes(data[:_HEADER_LEN]) if data else b"")


async def aread_for_update(tier: RedisTier, key: str) -> tuple[Entry | None, bytes]:
    try:
        data = await tier._aclient().get(tier._vkey(key))
    except tier._redis.exceptions.ResponseError as exc:  # see read_for_update
        return tier._type_error(key, exc), b""
    return tier._decode(key, data), (bytes(data[:_HEADER_LEN]) if data else b"")


def compare_and_set(tier: RedisTier, key: str, token: bytes, entry: Entry) -> bool:
    """Store ``entry`` if the record is unchanged since ``read_for_update`` returned ``token``.
    False: it changed, or ``entry`` is already dead (nothing is written; read again)."""
    args = _cas_args(tier, key, token, entry)
    return args is not None and bool(tier._eval(tier._sync_client(), "cas", 2, *args))


async def acompare_and_set(tier: RedisTier, key: str, token: bytes, entry: Entry) -> bool:
    args = _cas_args(tier, key, token, entry)
    return args is not None and bool(await tier._aeval(tier._aclient(), "cas", 2, *args))


# Last, so that redis_bus (which imports this module only lazily) finds RedisTier defined.
from tiercache.adapters.redis_bus import RedisBus  # noqa: E402
