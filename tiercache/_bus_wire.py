"""Bus messages on the wire: strict validation of every field, and HMAC authentication.

Anything that can PUBLISH on the channel can put bytes in front of every subscriber, so a
received message is untrusted input until it passed :meth:`BusWire.decode`:

* the raw size is bounded before parsing (``MAX_MESSAGE_BYTES``), orjson refuses nesting deeper
  than 1024 levels with an ordinary error, and every field is checked with exact types (no
  ``str()``/``int()`` coercion of nested values, so no RecursionError either): a known op, at most
  ``MAX_KEYS`` keys and ``MAX_TAGS`` tags of bounded length, integers in ``[0, 2**63)``, times
  finite and not further ahead of this clock than ``MAX_SKEW`` seconds, versions not further
  ahead of this clock's nanoseconds than the same skew;
* with signing keys (taken from the cache's ``SignedCodec``: the bus key is an HMAC of each
  codec key, so rotation works as for entries: the first key signs, all verify), a message is
  ``{"tcbs":1,"kid":"<8 hex>","sig":"<64 hex>","m":<message>}``; the MAC covers the channel name
  and the exact bytes of ``<message>``, and is checked before the message is parsed. Unsigned
  messages are refused, and so are signed ones sent more than ``MAX_AGE`` seconds ago (replays);
* a refused message is counted by reason (``rejected``) and logged at most once per
  ``LOG_INTERVAL`` seconds, one line, never a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from ._bus import BUS_FORMAT, BusMessage

__all__ = ["MAX_KEYS", "MAX_MESSAGE_BYTES", "MAX_SKEW", "MAX_TAGS", "BusWire", "bus_keys"]

logger = logging.getLogger("tiercache")

OPS = frozenset(("set", "delete", "expire", "tags", "clear", "beat", "bye"))
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_KEYS = 100_000
MAX_TAGS = 10_000
MAX_KEY_CHARS = 64 * 1024
MAX_TAG_CHARS = 4096
MAX_NAME_CHARS = 4096  # namespace
MAX_ORIGIN_CHARS = 64
MAX_INT = 2**63 - 1
MAX_SKEW = 300.0  # seconds a sender's clock may be ahead of ours
MAX_AGE = 300.0  # seconds a signed message stays acceptable (bounds replays)
LOG_INTERVAL = 10.0

_BUS_KEY_LABEL = b"tiercache bus key"
_MAC_PREFIX = b"tiercache-bus\x001\x00"
_HEADER = re.compile(rb'\{"tcbs":1,"kid":"([0-9a-f]{8})","sig":"([0-9a-f]{64})","m":')
_HEADER_LEN = len(b'{"tcbs":1,"kid":"","sig":"","m":') + 8 + 64


def bus_keys(codec: Any) -> tuple[bytes, dict[bytes, bytes]] | None:
    """(signing kid, {kid: bus key}) derived from a ``SignedCodec``'s keys, or None (unsigned).

    The bus never uses a codec key directly: each bus key is ``HMAC(codec key, label)``, so a
    bus MAC can never be replayed as an entry signature or the other way round.
    """
    from .signing import SignedCodec

    if not isinstance(codec, SignedCodec):
        return None
    keys: dict[bytes, bytes] = codec._keys  # kid -> codec key (kids are public key ids)
    derived = {kid: hmac.new(key, _BUS_KEY_LABEL, hashlib.sha256).digest() for kid, key in keys.items()}
    return codec._signing_kid, derived


class Rejected(Exception):
    """A message that does not pass validation (the reason is the message)."""


def _strings(value: Any, limit: int, chars: int, what: str) -> tuple[str, ...]:
    if type(value) is not list:
        raise Rejected(f"{what} is not a list")
    if len(value) > limit:
        raise Rejected(f"too many {what}")
    for item in value:
        if type(item) is not str or len(item) > chars:
            raise Rejected(f"a {what[:-1]} is not a bounded string")
    return tuple(value)


def _int(value: Any, what: str, upper: int = MAX_INT) -> int:
    if type(value) is not int or not 0 <= value <= upper:
        raise Rejected(f"{what} is not an integer in range")
    return value


def _time(value: Any, what: str, upper: float) -> float:
    if type(value) is int:
        value = float(value)
    if type(value) is not float or not math.isfinite(value) or not 0.0 <= value <= upper:
        raise Rejected(f"{what} is not a finite time in range")
    return value


class BusWire:
    """Encodes this cache's messages and validates (and authenticates) received ones."""

    def __init__(self, channel: str, codec: Any, clock: Callable[[], float]) -> None:
        self.channel = channel
        self._channel_bytes = channel.encode("utf-8", "surrogatepass")
        self.clock = clock
        keys = bus_keys(codec)
        self.signed = keys is not None
        self._kid, self._keys = keys if keys is not None else (b"", {})
        #: Refused messages by reason (a reason is a short fixed text).
        self.rejected: dict[str, int] = {}
        self._lock = threading.Lock()
        self._logged_at = -math.inf
        self._unlogged = 0

    # --- sending -----------------------------------------------------------------------------

    def encode(self, msg: BusMessage) -> bytes:
        body = msg.encode()
        if not self.signed:
            return body
        return b"".join(
            (
                b'{"tcbs":1,"kid":"',
                self._kid,
                b'","sig":"',
                self._mac(self._keys[self._kid], body),
                b'","m":',
                body,
                b"}",
            )
        )

    def _mac(self, key: bytes, body: bytes) -> bytes:
        data = _MAC_PREFIX + self._channel_bytes + b"\x00" + body
        return hmac.new(key, data, hashlib.sha256).hexdigest().encode("ascii")

    # --- receiving ---------------------------------------------------------------------------

    def decode(self, data: bytes) -> BusMessage | None:
        """The message, or None after counting (and maybe logging) why it was refused."""
        try:
            return self._decode(data)
        except Rejected as exc:
            self.reject(str(exc))
            return None

    def _decode(self, data: bytes) -> BusMessage:
        if not isinstance(data, (bytes, bytearray)):
            raise Rejected("not bytes")
        if len(data) > MAX_MESSAGE_BYTES:
            raise Rejected("message too large")
        body = bytes(data)
        if self.signed:
            match = _HEADER.match(body)
            if match is None or body[-1:] != b"}":
                raise Rejected("unsigned message")
            key = self._keys.get(match.group(1))
            if key is None:
                raise Rejected("signed with an unknown key")
            body = body[_HEADER_LEN:-1]
            if not hmac.compare_digest(self._mac(key, body), match.group(2)):
                raise Rejected("bad signature")
        try:
            doc: Any = orjson.loads(body)
        except orjson.JSONDecodeError:  # includes nesting deeper than orjson's limit
            raise Rejected("not JSON") from None
        if type(doc) is not dict or doc.get("tcbus") != BUS_FORMAT:
            raise Rejected("not a tiercache bus message")
        now = self.clock()
        latest = max(now, time.time()) + MAX_SKEW  # (an injected clock may run behind)
        try:
            op = doc["op"]
            if type(op) is not str or op not in OPS:
                raise Rejected("unknown op")
            namespace = doc["ns"]
            if type(namespace) is not str or len(namespace) > MAX_NAME_CHARS:
                raise Rejected("bad namespace")
            origin = doc["o"]
            if type(origin) is not str or not 0 < len(origin) <= MAX_ORIGIN_CHARS:
                raise Rejected("bad origin")
            keys = _strings(doc["k"], MAX_KEYS, MAX_KEY_CHARS, "keys")
            tags = _strings(doc["t"], MAX_TAGS, MAX_TAG_CHARS, "tags")
            version = _int(doc["n"], "version", time.time_ns() + int(MAX_SKEW * 1e9))
            at = _time(doc["at"], "at", latest)
            seq = _int(doc["q"], "sequence")
            sent = _time(doc.get("w", at), "sent", latest)
        except KeyError:
            raise Rejected("missing field") from None
        if self.signed and sent < now - MAX_AGE:
            raise Rejected("signed message too old (replay?)")
        return BusMessage(namespace, op, keys, tags, version, at, origin, seq, sent)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            self._unlogged += 1
            now = time.monotonic()
            if now - self._logged_at < LOG_INTERVAL:
                return
            self._logged_at, count, self._unlogged = now, self._unlogged, 0
        logger.warning(
            "refused %d invalidation bus message(s) on %s (latest: %s)%s",
            count,
            self.channel,
            reason,
            "" if self.signed else "; the bus is unauthenticated (the cache has no SignedCodec)",
        )

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


def split_keys(
    keys: Sequence[str], count: int = 10_000, size: int = MAX_MESSAGE_BYTES // 4
) -> list[Sequence[str]]:
    """``keys`` in chunks a receiver accepts: at most ``count`` keys and about ``size`` bytes each
    (a larger batch becomes several messages). Never empty: no keys gives one empty chunk."""
    chunks: list[Sequence[str]] = []
    start = total = 0
    for i, key in enumerate(keys):
        total += len(key) * 4 + 4  # worst case UTF-8 and JSON quoting, cheaply
        if i - start >= count or (total > size and i > start):
            chunks.append(keys[start:i])
            start, total = i, len(key) * 4 + 4
    chunks.append(keys[start:])
    return chunks
