"""The invalidation bus: how one process tells the others to drop their L1 copies.

A *transport* (``Bus``) only moves bytes on a channel: Redis pub/sub (``RedisBus`` in
``tiercache.adapters.redis``), or ``tiercache.testing.LocalBus`` in tests. The core owns the
messages (:class:`BusMessage`), the per-origin sequence numbers and what a receiver does:

* messages from our own origin are ignored;
* ``set``/``delete``/``expire`` drop the L1 copies of the keys that are older than the message's
  version (receivers do not re-read: the next caller that wants the key reads it, so there is no
  read storm), and mark a running load of the key as superseded;
* ``tags`` moves the tags' invalidation times forward; ``clear`` empties L1 for the namespace;
* a gap in an origin's sequence, or the transport reconnecting (``on_reset``), means messages may
  have been lost: L1 is cleared for the namespace; heartbeats (``tiercache._bus_live``) bound the
  time a silently broken bus goes unnoticed. Staleness is therefore bounded by the bus delay while
  the bus works and by the bus's ``liveness`` when it does not.

Received bytes are untrusted: ``tiercache._bus_wire`` validates (and, with a ``SignedCodec``,
authenticates) every message before the core acts on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import orjson

__all__ = ["Bus", "BusMessage"]

BUS_FORMAT = 1


@runtime_checkable
class Bus(Protocol):
    """A transport for invalidation messages (bytes on a named channel).

    ``start`` subscribes and must call ``on_message(data)`` for every message on ``channel``
    (from any thread) and ``on_reset()`` after every (re)connection, including the first once it
    is subscribed. ``publish`` must not block for long (short timeouts) and may raise: the core
    counts and logs a failed publish, it never fails the caller's write because of it.
    """

    def start(
        self, channel: str, on_message: Callable[[bytes], None], on_reset: Callable[[], None]
    ) -> None: ...

    def publish(self, channel: str, data: bytes) -> None: ...

    async def apublish(self, channel: str, data: bytes) -> None: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class BusMessage:
    """One invalidation. ``keys`` are full keys (namespace included); ``at`` is Unix seconds."""

    namespace: str
    op: str  # "set" | "delete" | "expire" | "tags" | "clear"
    keys: tuple[str, ...]
    tags: tuple[str, ...]
    version: int
    at: float
    origin: str
    seq: int
    sent: float = 0.0  # the sender's clock when it sent the message (bounds replays)

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "tcbus": BUS_FORMAT,
                "ns": self.namespace,
                "op": self.op,
                "k": list(self.keys),
                "t": list(self.tags),
                "n": self.version,
                "at": self.at,
                "o": self.origin,
                "q": self.seq,
                "w": self.sent,
            }
        )
