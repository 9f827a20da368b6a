"""Test support shipped with tiercache: a clock, fakes, and the contracts every tier must pass.

Modules: ``clock`` (:class:`FakeClock`), ``fakes`` (a remote-like tier, an in-process bus, a
Redis stand-in, :func:`bypass`), ``kv`` (an in-memory Cloudflare KV), ``contracts``
(:class:`TierContract`, :class:`LeaseContract`). The names below load on first use, so
``from tiercache.testing import FakeClock`` needs no pytest; only the contracts import it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .clock import FakeClock
    from .contracts import LeaseContract, TierContract
    from .fakes import FakeRedisServer, FakeRemoteTier, LocalBus, bypass, make_entry
    from .kv import FakeCloudflareKV

__all__ = [
    "FakeClock",
    "FakeCloudflareKV",
    "FakeRedisServer",
    "FakeRemoteTier",
    "LeaseContract",
    "LocalBus",
    "TierContract",
    "bypass",
    "make_entry",
]

_EXPORTS = {
    "FakeClock": ".clock",
    "FakeCloudflareKV": ".kv",
    "FakeRedisServer": ".fakes",
    "FakeRemoteTier": ".fakes",
    "LeaseContract": ".contracts",
    "LocalBus": ".fakes",
    "TierContract": ".contracts",
    "bypass": ".fakes",
    "make_entry": ".fakes",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
