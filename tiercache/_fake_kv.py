"""Moved to ``tiercache.testing.kv``; this alias keeps imports written before the move working."""

from __future__ import annotations

from .testing.kv import TIMED_OUT, FakeCloudflareKV, Item, KVStats, Record, Reply, Route, _failure

__all__ = ["TIMED_OUT", "FakeCloudflareKV", "Item", "KVStats", "Record", "Reply", "Route", "_failure"]
