"""RedisBus: the invalidation bus transport on Redis pub/sub (one subscriber thread per bus).

What it does, and what it leaves to the core
============================================

The bus moves bytes; ``tiercache._bus`` owns the messages (origin, sequence numbers, what a gap
means). ``start(channel, on_message, on_reset)`` subscribes; ``publish``/``apublish`` send with
the tier's short timeouts and raise on failure (the core counts and logs it; its receivers then
see a sequence gap and clear their L1).

Subscriber
==========

One daemon thread per bus, whatever mix of sync and async callers the process has, holding one
pub/sub connection for all the bus's channels. The connection always speaks RESP2
(``protocol=2``): under RESP3 (redis-py 8's default) messages arrive as push frames that a RESP2
reader never returns. The thread:

* subscribes, waits for the server's confirmation of every channel, and only then calls each
  channel's ``on_reset``: on the first subscription and after every reconnection, so a receiver
  clears its L1 whenever messages may have been missed. Messages published after the
  confirmation are delivered after ``on_reset`` (one thread, in order);
* sends a ``PING`` when the connection has been quiet for ``ping_interval`` seconds and treats a
  missing ``PONG`` after ``ping_timeout`` as a lost connection (a black-holed socket does not
  raise on its own);
* on any error, drops the connection and reconnects after a jittered backoff (25 to 50 ms first,
  doubling to 2 s); on Cluster it moves to the next node;
* survives ``fork()``: a child process starts its own subscriber (and so clears its inherited L1).

Callbacks run on the subscriber thread; one that raises is logged and does not stop the bus.

Liveness
========

``liveness`` (seconds, default 1.0; None turns it off) is the bound the core keeps on a silently
broken bus: it publishes a sequence-numbered heartbeat every ``liveness / 5`` seconds and, when its
own beats stop coming back, when another process's beats stop, or when a publish fails, clears
the namespace's L1 and keeps it off until the bus is heard again (``tiercache._bus_live``). The
``PING`` above only decides when to reconnect.

Cluster
=======

Classic ``PUBLISH``/``SUBSCRIBE``: Redis Cluster forwards a classic publish to every node over the
cluster bus, so a message published on any live node reaches subscribers on every node, and
neither side depends on the channel's slot being served (sharded ``SPUBLISH`` would lose the
channel with its shard's primary when it has no replica). Publishers and the subscriber agree on
a node to meet on, so that no message takes a hop over the cluster bus (that hop cost a 40-45 ms
latency mode): the owner of the channel's slot, and when it fails, the next primary in a fixed
order (sorted by address) that every process computes the same way. A process publishes every
message (sync or async) through one node while it works, since two publishes sent through two
nodes can reach a subscriber in either order; a publish that fails on its node is retried at once
on the next, so the loss of the channel's node costs no message. The subscriber, when its node
dies, reconnects to the next node in the same order and clears L1 (a reconnection always does).

Connections
===========

``RedisBus(url=...)`` (any ``RedisTier`` option may follow) builds its own connection holder;
``RedisBus.for_tier(tier)`` shares a ``RedisTier``'s settings and its publishing clients (the
tier is not closed by the bus). Async publishing uses the tier's per-event-loop client, so
``asyncio.run`` may be called any number of times; concurrent ``apublish`` calls on one loop are
sent in call order (a sequence number assigned before the call stays in order on the wire).
Passwords never appear in ``repr`` or in logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tiercache.adapters.redis import RedisTier

__all__ = ["RedisBus"]

logger = logging.getLogger("tiercache.redis")

_Callbacks = tuple[Callable[[bytes], None], Callable[[], None]]
_buses: weakref.WeakSet[RedisBus] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for bus in list(_buses):
        bus._restart_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _text(data: Any) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)


class RedisBus:
    """A ``tiercache._bus.Bus`` over Redis pub/sub. See the module docstring."""

    def __init__(
        self,
        url: str | None = None,
        *,
        tier: RedisTier | None = None,
        ping_interval: float = 1.0,
        ping_timeout: float = 1.0,
        liveness: float | None = 1.0,
        **tier_options: Any,
    ) -> None:
        if tier is not None and (url is not None or tier_options):
            raise ValueError("RedisBus takes either tier= or url=/RedisTier options, not both")
        if ping_interval <= 0 or ping_timeout <= 0:
            raise ValueError("RedisBus ping_interval and ping_timeout must be positive")
        if liveness is not None and not 0.05 <= liveness <= 3600:
            raise ValueError("RedisBus liveness must be None or between 0.05 and 3600 seconds")
        if tier is None:
            from tiercache.adapters.redis import RedisTier

            tier = RedisTier(url, name="redis-bus", **tier_options)
            self._owns_tier = True
        else:
            self._owns_tier = False
        self._tier: RedisTier = tier
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        #: The staleness bound the core keeps with heartbeats (``tiercache._bus_live``); None: off.
        self.liveness = liveness
        #: The prefix channels are named with when the cache has no prefixed shared tier.
        self.prefix = tier.prefix
        self._pub_node: str | None = None  # Cluster: the node publishes currently go through
        self._lock = threading.Lock()
        self._subs: dict[str, list[_Callbacks]] = {}
        self._fresh: list[_Callbacks] = []  # started since the last subscription: owed an on_reset
        self._stop = threading.Event()
        self._ready = threading.Event()  # subscribed to every channel known when it was set
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        #: How many times the subscriber has (re)subscribed; tests and health checks read it.
        self.subscriptions = 0
        _buses.add(self)

    @classmethod
    def for_tier(cls, tier: RedisTier, **options: Any) -> RedisBus:
        """A bus on the same Redis as ``tier``, with its settings and clients (not closed here)."""
        return cls(tier=tier, **options)

    def __repr__(self) -> str:
        return f"RedisBus({self._tier!r}, channels={sorted(self._subs)!r})"

    # --- the Bus protocol --------------------------------------------------------------------

    def start(self, channel: str, on_message: Callable[[bytes], None], on_reset: Callable[[], None]) -> None:
        """Subscribe ``channel`` (in the background: ``on_reset`` says when it is done)."""
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("RedisBus is closed")
            self._subs.setdefault(channel, []).append((on_message, on_reset))
            self._fresh.append((on_message, on_reset))
            self._ready.clear()  # not subscribed for the newcomer yet
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tiercache-redis-bus", daemon=True)
                self._thread.start()

    def publish(self, channel: str, data: bytes) -> None:
        client = self._tier._sync_client()
        if not self._tier._cluster:
            client.publish(channel, data)
            return
        error: Exception | None = None
        for node in self._publish_nodes(client, channel):
            try:
                client.execute_command("PUBLISH", channel, data, target_nodes=node)
            except _node_errors() as exc:  # that node is gone: the next one in the fixed order
                error = exc
                continue
            self._pub_node = node.name
            return
        raise error if error is not None else ConnectionError("no Redis Cluster node to publish on")

    async def apublish(self, channel: str, data: bytes) -> None:
        # One lock per loop, taken before the first await: asyncio.Lock is FIFO, so messages leave
        # in the order the calls were made, even though the pool has several connections.
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        async with lock:
            client = self._tier._aclient()
            if not self._tier._cluster:
                await client.publish(channel, data)
                return
            await client.initialize()  # the slot map (a no-op once loaded)
            error: Exception | None = None
            for node in self._publish_nodes(client, channel):
                try:
                    await client.execute_command("PUBLISH", channel, data, target_nodes=node)
                except _node_errors() as exc:
                    error = exc
                    continue
                self._pub_node = node.name
                return
            raise error if error is not None else ConnectionError("no Redis Cluster node to publish on")

    def _publish_nodes(self, client: Any, channel: str) -> list[Any]:
        """Cluster: the nodes to try, in order. Every publish of this process leaves from one
        node while it works (two nodes would forward messages over the cluster bus in either
        order): the last one that worked, else the owner of the channel's slot (where the
        subscribers sit, see _channel_nodes); when it fails, the next in a fixed order."""
        nodes = _channel_nodes(client, channel)
        current = self._pub_node
        if current is not None:
            for i, node in enumerate(nodes):
                if node.name == current:
                    return nodes[i:] + nodes[:i]
        return nodes

    def close(self) -> None:
        thread = self._stop_thread()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        if self._owns_tier:
            self._tier.close()

    async def aclose(self) -> None:
        thread = self._stop_thread()
        if thread is not None and thread is not threading.current_thread():
            await asyncio.to_thread(thread.join, 2.0)
        if self._owns_tier:
            await self._tier.aclose()

    # --- status ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while subscribed to every channel started so far."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        """Block until subscribed to every channel started so far (True) or ``timeout`` passes."""
        return self._ready.wait(timeout)

    # --- the subscriber thread ---------------------------------------------------------------

    def _stop_thread(self) -> threading.Thread | None:
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
        _buses.discard(self)
        return thread

    def _restart_after_fork(self) -> None:
        """In a forked child: the parent's thread does not exist here; start our own."""
        self._lock = threading.Lock()  # the parent's locks may have been held at fork time
        stopped = self._stop.is_set()
        self._stop = threading.Event()
        if stopped:
            self._stop.set()
        self._ready = threading.Event()
        self._locks = weakref.WeakKeyDictionary()
        self._pid = os.getpid()
        self._thread = None
        if self._subs and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="tiercache-redis-bus", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        backoff = 0.05
        node = 0
        outage_logged = False
        while not self._stop.is_set():
            client: Any = None
            pubsub: Any = None
            try:
                client = self._subscriber(node)
                pubsub = client.pubsub()
                subscribed: set[str] = set()
                self._subscribe_new(pubsub, subscribed)
                backoff = 0.05
                if outage_logged:
                    logger.warning("invalidation bus reconnected (%r)", self._tier)
                    outage_logged = False
                self._listen(pubsub, subscribed)
            except Exception as exc:  # connection lost, refused, timed out: reconnect later
                if not self._stop.is_set():
                    level = logging.DEBUG if outage_logged else logging.WARNING
                    logger.log(level, "invalidation bus lost (%r): %s", self._tier, _describe(exc))
                    outage_logged = True
                node += 1
            finally:
                self._ready.clear()
                for thing in (pubsub, client):
                    if thing is not None:
                        with contextlib.suppress(Exception):
                            thing.close()
            self._stop.wait(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 2.0)

    def _subscriber(self, attempt: int) -> Any:
        """A pub/sub client. On Cluster, on the node that carries the first channel (the owner of
        its slot, through which publishers send: no hop over the cluster bus), and when that
        fails, on the next node in the same fixed order as the publishers'."""
        if not self._tier._cluster:
            return self._tier._subscriber_client(attempt)
        with self._lock:
            channel = next(iter(self._subs), "")
        client = self._tier._sync_client()
        if attempt and attempt % 4 == 0:
            with contextlib.suppress(Exception):  # the topology may have changed (a node died)
                client.nodes_manager.initialize()
        nodes = _channel_nodes(client, channel)
        return self._tier._subscriber_client(attempt, node=nodes[attempt % len(nodes)])

    def _subscribe_new(self, pubsub: Any, subscribed: set[str]) -> None:
        """Subscribe the channels not yet subscribed, wait for the confirmations, then call the
        ``on_reset`` of every subscriber that may have missed messages: all of them on a new
        connection, the newly started ones otherwise."""
        with self._lock:
            wanted = [ch for ch in self._subs if ch not in subscribed]
            if subscribed:
                owed, self._fresh = self._fresh, []
            else:
                owed = [cb for group in self._subs.values() for cb in group]
                self._fresh = []
        if wanted:
            self._confirm(pubsub, wanted)
            subscribed.update(wanted)
            self.subscriptions += 1
        with self._lock:
            # Invariant: ready means every started callback is subscribed and has had its reset.
            if not self._fresh and all(ch in subscribed for ch in self._subs):
                self._ready.set()
        for _, reset in owed:
            self._call(reset)

    def _confirm(self, pubsub: Any, wanted: list[str]) -> None:
        pubsub.subscribe(*wanted)
        pending = set(wanted)
        deadline = time.monotonic() + max(1.0, 4 * self._tier.connect_timeout)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no SUBSCRIBE confirmation for {sorted(pending)}")
            msg = pubsub.get_message(timeout=min(remaining, 0.1))
            if msg is None:
                continue
            if msg.get("type") == "subscribe":
                pending.discard(_text(msg.get("channel")))
            else:
                self._dispatch(msg)  # a message on a channel subscribed earlier

    def _listen(self, pubsub: Any, subscribed: set[str]) -> None:
        """Deliver messages until the connection fails or the bus is closed."""
        last_heard = time.monotonic()
        ping_sent: float | None = None
        while not self._stop.is_set():
            if not self._ready.is_set():
                self._subscribe_new(pubsub, subscribed)  # start() added a channel
            # A short read timeout only so that close() and new channels are noticed quickly.
            msg = pubsub.get_message(timeout=0.1)
            now = time.monotonic()
            if msg is not None:
                last_heard = now
                if msg.get("type") == "pong":
                    ping_sent = None
                else:
                    self._dispatch(msg)
            elif ping_sent is not None:
                if now - ping_sent > self.ping_timeout:
                    raise TimeoutError(f"no PONG within {self.ping_timeout} s")
            elif now - last_heard > self.ping_interval:
                pubsub.ping()
                ping_sent = now

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if msg.get("type") != "message":
            return
        data = msg.get("data")
        if not isinstance(data, bytes):
            return
        with self._lock:
            callbacks = list(self._subs.get(_text(msg.get("channel")), ()))
        for on_message, _ in callbacks:
            self._call(on_message, data)

    @staticmethod
    def _call(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("an invalidation bus callback failed")


def _node_errors() -> tuple[type[Exception], ...]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)


def _channel_nodes(client: Any, channel: str) -> list[Any]:
    """Cluster primaries in the order every process tries them for ``channel``: the owner of the
    channel's slot first, then the others sorted by name (so all processes agree)."""
    primaries = sorted(client.get_primaries(), key=lambda n: n.name)
    if not primaries:
        raise ConnectionError("no Redis Cluster node known")
    try:
        owner = client.get_node_from_key(channel)
    except Exception:
        owner = None
    if owner is None or all(n.name != owner.name for n in primaries):
        return primaries
    i = next(i for i, n in enumerate(primaries) if n.name == owner.name)
    return primaries[i:] + primaries[:i]


def _describe(exc: BaseException) -> str:
    """An exception for the log: its type and message (redis-py's name host and port, no secret)."""
    return f"{type(exc).__name__}: {exc}"
