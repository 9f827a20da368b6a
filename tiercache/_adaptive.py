"""Adaptive caching: a loader deciding the fate of its own result (``current_load()``)."""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["LoadContext", "current_load"]


@dataclass
class LoadContext:
    """The load in progress, as seen from inside the loader.

    Set ``ttl``/``stale_ttl``/``tags`` to override the call's options for this result only (for
    example a short ttl for ``None``), or ``cache = False`` to return the value without storing it.
    """

    key: str
    ttl: float | None = None
    stale_ttl: float | None = None
    tags: tuple[str, ...] | None = None
    cache: bool = True

    def set_tags(self, tags: Iterable[str]) -> None:
        self.tags = tuple(tags)


_current: ContextVar[LoadContext | None] = ContextVar("tiercache_current_load", default=None)


def current_load() -> LoadContext | None:
    """The LoadContext of the loader calling this (None outside a tiercache load)."""
    return _current.get()
