"""Tag invalidation times as stored in a shared tier: validated, and signed with a SignedCodec.

A tag time is ``repr(at)``, or with a ``SignedCodec`` as the cache's codec
``repr(at)|<kid>|<hex HMAC>``, the HMAC (with the bus key of ``tiercache._bus_wire.bus_keys``)
covering the tag hash's name, the tag and the time, so a time cannot be forged nor moved to
another tag or namespace. A reader that finds a time it cannot trust (not a number, not finite,
later than its clock plus ``MAX_SKEW``, unsigned or badly signed while it signs) takes the tag as
invalidated *now*: it may reload more, never serve an invalidated entry. The numeric part comes
first so that the store's own script can still compare times.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from typing import Any

from ._bus_wire import MAX_SKEW, bus_keys

__all__ = ["seal", "unseal"]

_MAC_PREFIX = b"tiercache-tag\x001\x00"
_derived: dict[int, tuple[Any, tuple[bytes, dict[bytes, bytes]] | None]] = {}


def _keys(codec: Any) -> tuple[bytes, dict[bytes, bytes]] | None:
    hit = _derived.get(id(codec))
    if hit is not None and hit[0] is codec:
        return hit[1]
    keys = bus_keys(codec)
    if len(_derived) > 64:
        _derived.clear()
    _derived[id(codec)] = (codec, keys)  # holds the codec: its id cannot be reused meanwhile
    return keys


def _mac(key: bytes, hash_name: str, tag: str, text: bytes) -> bytes:
    data = b"\x00".join(
        (_MAC_PREFIX + hash_name.encode("utf-8", "surrogatepass"), tag.encode("utf-8", "surrogatepass"), text)
    )
    return hmac.new(key, data, hashlib.sha256).hexdigest().encode("ascii")


def seal(codec: Any, hash_name: str, tag: str, at: float) -> bytes:
    """The stored form of ``at`` for ``tag`` in the hash ``hash_name``."""
    at = float(at)
    if not math.isfinite(at):
        raise ValueError(f"a tag time must be finite, not {at!r}")
    text = repr(at).encode("ascii")
    keys = _keys(codec)
    if keys is None:
        return text
    kid, derived = keys
    return b"|".join((text, kid, _mac(derived[kid], hash_name, tag, text)))


def unseal(codec: Any, hash_name: str, tag: str, raw: Any, now: float) -> tuple[float | None, str | None]:
    """(time, problem): the tag's time (None: never invalidated), and why it was not trusted."""
    if raw is None:
        return None, None
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    parts = data.split(b"|")
    keys = _keys(codec)
    if keys is not None:
        if len(parts) != 3:
            return now, "tag time is not signed"
        key = keys[1].get(parts[1])
        if key is None or not hmac.compare_digest(_mac(key, hash_name, tag, parts[0]), parts[2]):
            return now, "tag time signature does not match"
    try:
        at = float(parts[0])
    except ValueError:
        return now, "tag time is not a number"
    if not math.isfinite(at) or not 0.0 <= at <= max(now, time.time()) + MAX_SKEW:
        return now, "tag time is not a finite time in range"
    return at, None
