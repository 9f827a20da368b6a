"""Fakes for tests: a remote-like tier in memory, an in-process bus, a Redis stand-in, bypass.

None of this imports pytest.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .._entry import Entry, next_version
from .._errors import TierError
from .._serde import Codec, JsonCodec
from .._tier import TierBinding

__all__ = ["FakeRedisServer", "FakeRemoteTier", "LocalBus", "bypass", "make_entry"]


_lease_tokens = itertools.count(1)


class FakeRemoteTier:
    """A remote-like tier held in memory: it stores envelope *bytes* (so values round-trip through
    the codec, as with Redis or KV), can be shared between instances (``store=``), counts calls,
    and fails on demand (``down = True``, or ``fail_next(n)``). For tests of the chain, not a cache.

    With ``leases=True`` it also offers the distributed-stampede lease, as RedisTier does, minus
    the waking: ``wait_for_entry`` answers at once with what is stored (one process, no waiting).
    """

    in_process = False
    shared = True
    offers_lease = False

    def __init__(
        self,
        store: dict[str, tuple[bytes, float]] | None = None,
        *,
        name: str = "remote",
        max_ttl: float | None = None,
        max_value_bytes: int | None = None,
        tag_times: dict[str, float] | None = None,
        leases: bool = False,
        lease_table: dict[str, tuple[str, float]] | None = None,
    ) -> None:
        self.name = name
        self.offers_lease = leases
        # key -> (token, expires at); pass one dict to tiers of "other processes" to share it
        self.leases: dict[str, tuple[str, float]] = {} if lease_table is None else lease_table
        self.max_ttl = max_ttl
        self.max_value_bytes = max_value_bytes
        self.store: dict[str, tuple[bytes, float]] = {} if store is None else store
        # Shared tag store (TagStore capability): pass the same dict to tiers of "other processes".
        self.tag_times: dict[str, float] = {} if tag_times is None else tag_times
        self.down = False
        self.calls: dict[str, int] = {
            "get": 0,
            "set": 0,
            "delete": 0,
            "tags": 0,
            "clear": 0,
            "get_many": 0,
            "set_many": 0,
            "lease": 0,
        }
        self._failures_left = 0
        self._clock: Callable[[], float] = time.time
        self._codec: Codec = JsonCodec()
        self._namespace = "tc"
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FakeRemoteTier(name={self.name!r}, keys={len(self.store)})"

    def bind(self, binding: TierBinding) -> None:
        self._clock = binding.clock
        self._codec = binding.codec
        self._namespace = binding.namespace

    def fail_next(self, count: int) -> None:
        """Make the next ``count`` calls raise TierError."""
        self._failures_left = count

    def _call(self, op: str) -> None:
        self.calls[op] += 1
        if self.down:
            raise TierError(self.name, "down (injected)")
        if self._failures_left > 0:
            self._failures_left -= 1
            raise TierError(self.name, "failure (injected)")

    def put_raw(self, key: str, data: bytes, ttl: float = 60.0) -> None:
        """Store arbitrary bytes under ``key`` (to test corrupt or foreign data)."""
        self.store[key] = (data, self._clock() + ttl)

    def get(self, key: str) -> Entry | None:
        self._call("get")
        item = self.store.get(key)
        if item is None or item[1] <= self._clock():
            return None
        entry = self._codec.loads(item[0])
        entry.payload = item[0]
        return entry if entry.stale_until > self._clock() else None

    def set(self, key: str, entry: Entry) -> bool:
        self._call("set")
        now = self._clock()
        until = entry.stale_until if self.max_ttl is None else min(entry.stale_until, now + self.max_ttl)
        if until <= now:
            return True
        data = entry.payload if entry.payload is not None else self._codec.dumps(entry)
        with self._lock:
            old = self.store.get(key)
            if old is not None and old[1] > now:
                try:
                    if self._codec.loads(old[0]).version > entry.version:
                        return False  # a newer version is stored: refused
                except Exception:  # foreign bytes: overwrite them
                    pass
            self.store[key] = (data, until)
        return True

    def delete(self, key: str, version: int) -> None:
        self._call("delete")
        with self._lock:
            old = self.store.get(key)
            if old is None:
                return
            try:
                if self._codec.loads(old[0]).version > version:
                    return
            except Exception:  # foreign bytes: delete them
                pass
            del self.store[key]

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """One "round trip": counted once, fails as a whole."""
        self._call("get_many")
        self.calls["get"] -= len(keys)  # the per-key reads below are not separate round trips
        return [self.get(k) for k in keys]

    def set_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        self._call("set_many")
        self.calls["set"] -= len(items)
        for k, e in items:
            self.set(k, e)

    def clear(self, prefix: str) -> int:
        self._call("clear")
        with self._lock:
            doomed = [k for k in self.store if k.startswith(prefix)]
            for k in doomed:
                del self.store[k]
        return len(doomed)

    def get_tag_times(self, tags: Sequence[str]) -> list[float | None]:
        self._call("tags")
        return [self.tag_times.get(f"{self._namespace}/{t}") for t in tags]

    def set_tag_times(self, tags: Sequence[str], at: float) -> None:
        self._call("tags")
        with self._lock:
            for t in tags:
                k = f"{self._namespace}/{t}"
                self.tag_times[k] = max(at, self.tag_times.get(k, at))

    def acquire_lease(self, key: str, ttl: float) -> str | None:
        self._call("lease")
        now = self._clock()
        with self._lock:
            held = self.leases.get(key)
            if held is not None and held[1] > now:
                return None
            token = f"lease-{next(_lease_tokens)}"
            self.leases[key] = (token, now + ttl)
            return token

    def release_lease(self, key: str, token: str) -> None:
        self._call("lease")
        with self._lock:
            if self.leases.get(key, ("",))[0] == token:
                del self.leases[key]

    def wait_for_entry(self, key: str, timeout: float) -> Entry | None:
        return self.get(key)

    def close(self) -> None:
        return None

    async def aacquire_lease(self, key: str, ttl: float) -> str | None:
        return self.acquire_lease(key, ttl)

    async def arelease_lease(self, key: str, token: str) -> None:
        self.release_lease(key, token)

    async def await_for_entry(self, key: str, timeout: float) -> Entry | None:
        return self.wait_for_entry(key, timeout)

    async def aclear(self, prefix: str) -> int:
        return self.clear(prefix)

    async def aget_tag_times(self, tags: Sequence[str]) -> list[float | None]:
        return self.get_tag_times(tags)

    async def aset_tag_times(self, tags: Sequence[str], at: float) -> None:
        self.set_tag_times(tags, at)

    async def aget(self, key: str) -> Entry | None:
        return self.get(key)

    async def aset(self, key: str, entry: Entry) -> bool:
        return self.set(key, entry)

    async def adelete(self, key: str, version: int) -> None:
        self.delete(key, version)

    async def aget_many(self, keys: Sequence[str]) -> list[Entry | None]:
        return self.get_many(keys)

    async def aset_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        self.set_many(items)

    async def aclose(self) -> None:
        return None


class LocalBus:
    """An in-process bus transport: every LocalBus built on one ``hub`` hears the others, as
    processes sharing a Redis would. Delivery is synchronous. ``disconnect()``/``reconnect()``
    simulate a lost connection (messages meanwhile are lost; reconnect calls ``on_reset``), and
    ``drop_next(n)`` loses the next ``n`` messages this bus would receive."""

    def __init__(self, hub: dict[str, list[LocalBus]] | None = None) -> None:
        self.hub: dict[str, list[LocalBus]] = {} if hub is None else hub
        self.connected = True
        self.published: list[bytes] = []
        self._drop = 0
        self._subscriptions: list[tuple[str, Callable[[bytes], None], Callable[[], None]]] = []

    def start(self, channel: str, on_message: Callable[[bytes], None], on_reset: Callable[[], None]) -> None:
        self._subscriptions.append((channel, on_message, on_reset))
        self.hub.setdefault(channel, []).append(self)
        on_reset()

    def publish(self, channel: str, data: bytes) -> None:
        if not self.connected:
            raise TierError("bus", "disconnected (injected)")
        self.published.append(data)
        for bus in list(self.hub.get(channel, ())):
            bus._deliver(channel, data)

    async def apublish(self, channel: str, data: bytes) -> None:
        self.publish(channel, data)

    def _deliver(self, channel: str, data: bytes) -> None:
        if not self.connected:
            return
        if self._drop:
            self._drop -= 1
            return
        for ch, on_message, _ in self._subscriptions:
            if ch == channel:
                on_message(data)

    def drop_next(self, count: int) -> None:
        self._drop = count

    def disconnect(self) -> None:
        self.connected = False

    def reconnect(self) -> None:
        self.connected = True
        for _, _, on_reset in self._subscriptions:
            on_reset()

    def close(self) -> None:
        for channel, _, _ in self._subscriptions:
            subscribers = self.hub.get(channel, [])
            if self in subscribers:
                subscribers.remove(self)
        self._subscriptions.clear()

    async def aclose(self) -> None:
        self.close()


class FakeRedisServer:
    """A Redis stand-in for your tests, on a loopback port (needs ``fakeredis[lua]``).

    ``tier(**options)`` builds a real ``RedisTier`` talking to it over TCP; ``down()`` makes every
    command fail (as a dead or unreachable Redis would) and ``up()`` brings it back, to test your
    code's behaviour when the cache tier fails. Use it as a context manager, or call ``close()``.
    tiercache's own tests use a real redis-server; this is for projects that cannot run one.
    """

    def __init__(self) -> None:
        try:
            import fakeredis
        except ImportError:
            raise ImportError("FakeRedisServer needs fakeredis: pip install 'fakeredis[lua]'") from None
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._server = fakeredis.TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-redis", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def tier(self, **options: Any) -> Any:
        """A ``RedisTier`` on this server (keyword options as for ``RedisTier``)."""
        from ..adapters.redis import RedisTier

        return RedisTier(url=self.url, **options)

    def down(self) -> None:
        self._server.fake_server.connected = False

    def up(self) -> None:
        self._server.fake_server.connected = True

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeRedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def bypass(*caches: Any) -> Iterator[None]:
    """Turn caching off for ``caches`` inside the block (for your own tests): every call runs
    its loader, reads find nothing, writes are dropped (values are still checked to be
    serialisable). Their in-process tiers are emptied for the namespace on entry, so even the
    decorators' inline hit path misses. Nothing is removed from shared tiers.
    """
    runtimes = [cache._rt for cache in caches]
    for rt in runtimes:
        rt.bypass = True
        rt.coherence.clear_local()
        for i in rt.l1:
            tier: Any = rt.tiers[i]
            if hasattr(tier, "clear"):
                tier.clear(rt.coherence.prefix)
    try:
        yield
    finally:
        for rt in runtimes:
            rt.bypass = False


def make_entry(
    key: str,
    value: Any,
    now: float,
    *,
    ttl: float = 60.0,
    stale_ttl: float = 0.0,
    tags: tuple[str, ...] = (),
    version: int | None = None,
) -> Entry:
    """An entry created at ``now``, fresh for ``ttl`` seconds, stale for ``stale_ttl`` more."""
    return Entry(
        key,
        value,
        created_at=now,
        fresh_until=now + ttl,
        stale_until=now + ttl + stale_ttl,
        tags=tags,
        version=next_version() if version is None else version,
    )
