"""Cache entries: a value with its absolute lifetime, tags and version.

Times are absolute wall-clock seconds (``time.time()`` scale) and travel inside the entry, so any
tier, in any process, can tell fresh from stale from dead without trusting its own TTL. Back-fill
copies an entry unchanged, which is why it can never extend a lifetime.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["Entry", "next_version"]


class Entry:
    """One cached value and its metadata. Treat as immutable once built.

    ``fresh_until <= stale_until`` always. Between the two the entry is *stale*: usable only for
    stale-while-revalidate or fail-safe. From ``stale_until`` on it is dead (a miss everywhere).
    ``version`` orders writes of one key (a later ``set``/``delete`` has a larger version), which
    is how a late loader result is kept from overwriting newer data. ``typed`` is False when the
    value came out of the JSON envelope and has not been converted to the caller's type yet.
    ``payload`` caches the envelope bytes so several remote tiers encode once. ``vtype`` is the
    value's declared type (None: undeclared), which the codec needs for user classes; on an entry
    not converted yet it is the class name its envelope declared (``y``), or None.
    """

    __slots__ = (
        "created_at",
        "delta",
        "fresh_until",
        "held",
        "key",
        "payload",
        "stale_until",
        "tags",
        "typed",
        "value",
        "version",
        "vtype",
    )

    def __init__(
        self,
        key: str,
        value: Any,
        *,
        created_at: float,
        fresh_until: float,
        stale_until: float,
        tags: tuple[str, ...] = (),
        version: int = 0,
        delta: float = 0.0,
        typed: bool = True,
        payload: bytes | None = None,
        vtype: Any = None,
        held: bool = False,
    ) -> None:
        self.key = key
        self.value = value
        self.created_at = created_at
        self.fresh_until = fresh_until
        self.stale_until = stale_until if stale_until >= fresh_until else fresh_until
        self.tags = tags
        self.version = version
        self.delta = delta
        self.typed = typed
        self.payload = payload
        self.vtype = vtype
        # fail-safe's throttle copy: a stale value kept fresh for a while (in-process only; not in
        # the envelope, so another process reading it from a shared tier sees a plain entry)
        self.held = held

    def is_fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def is_alive(self, now: float) -> bool:
        """Fresh or stale: not yet past the hard expiry."""
        return now < self.stale_until

    def remaining(self, now: float) -> float:
        """Seconds until hard expiry (what a tier may keep this entry for)."""
        return self.stale_until - now

    def replace(self, **changes: Any) -> Entry:
        """A copy with some fields changed; the cached payload is dropped unless given."""
        fields = {name: getattr(self, name) for name in self.__slots__ if name != "payload"}
        fields.update(changes)
        key = fields.pop("key")
        value = fields.pop("value")
        return Entry(key, value, **fields)

    def clamped(self, until: float) -> Entry:
        """This entry as a tier that must drop it at ``until`` keeps it (never longer-lived)."""
        if until >= self.stale_until:
            return self
        return self.replace(fresh_until=min(self.fresh_until, until), stale_until=until, payload=self.payload)

    def __repr__(self) -> str:
        return (
            f"Entry(key={self.key!r}, value={self.value!r}, created_at={self.created_at:.3f}, "
            f"fresh_until={self.fresh_until:.3f}, stale_until={self.stale_until:.3f}, "
            f"tags={self.tags!r}, version={self.version})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__ if n not in _NOT_COMPARED)

    __hash__ = None  # type: ignore[assignment]


_NOT_COMPARED = ("payload", "typed", "vtype", "held")  # caches and markers, not what the entry says

_version_lock = threading.Lock()
_last_version = 0


def next_version() -> int:
    """A process-wide strictly increasing version, close to wall-clock nanoseconds.

    Wall-clock based so that versions from different processes compare sensibly (a write that
    happened later usually has a larger version); strictly increasing within the process so two
    writes in the same nanosecond still order.
    """
    global _last_version
    with _version_lock:
        v = time.time_ns()
        if v <= _last_version:
            v = _last_version + 1
        _last_version = v
        return v
