"""Checks of what callers hand the cache (loaders, the tier chain), with errors that say what to do."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from ._errors import CacheClosedError, ConfigurationError

__all__ = ["check_batch_loader", "check_loader", "check_tier_order", "closed_error"]


def check_loader(loader: Any) -> None:
    """Refuse a loader that cannot be called with no arguments, before the flow calls it.

    Cheap enough for every miss: a few attribute reads for plain functions; other callables
    (partials, objects with ``__call__``) are only checked for being callable.
    """
    if not callable(loader):
        if inspect.iscoroutine(loader):
            loader.close()  # it will never run: no "never awaited" warning on top of this error
            raise ConfigurationError(
                f"the loader is a coroutine ({loader.__qualname__}() was called): pass the "
                f"function itself, {loader.__qualname__} without (), and the cache calls it on a miss"
            )
        raise ConfigurationError(
            f"the loader must be a function taking no arguments, not {type(loader).__name__} "
            f"{loader!r:.80}: pass `load`, not `load()`; to pass arguments use "
            "`lambda: load(user_id)` or functools.partial(load, user_id)"
        )
    code = getattr(loader, "__code__", None)
    if code is None:
        return
    required = code.co_argcount + code.co_kwonlyargcount - len(getattr(loader, "__defaults__", None) or ())
    required -= len(getattr(loader, "__kwdefaults__", None) or {})
    if inspect.ismethod(loader):
        required -= 1  # self is bound
    if required > 0:
        name = getattr(loader, "__qualname__", repr(loader))
        params = ", ".join(inspect.signature(loader).parameters)
        raise ConfigurationError(
            f"the loader {name}({params}) takes arguments, but the cache calls it "
            f"with none: pass `lambda: {loader.__name__}(...)` or functools.partial("
            f"{loader.__name__}, ...)"
        )


def check_batch_loader(load_many: Any) -> None:
    """Refuse a ``get_many_cached`` loader that cannot be called with one argument (the keys)."""
    if not callable(load_many):
        if inspect.iscoroutine(load_many):
            load_many.close()
        raise ConfigurationError(
            f"load_many must be a function taking the list of missing keys, not "
            f"{type(load_many).__name__}: pass `load_many`, not `load_many(...)`"
        )
    code = getattr(load_many, "__code__", None)
    if code is None:
        return
    bound = 1 if inspect.ismethod(load_many) else 0
    positional = code.co_argcount - bound
    required = positional - len(getattr(load_many, "__defaults__", None) or ())
    kw_required = code.co_kwonlyargcount - len(getattr(load_many, "__kwdefaults__", None) or {})
    takes_varargs = bool(code.co_flags & inspect.CO_VARARGS)
    if required > 1 or kw_required > 0 or (positional < 1 and not takes_varargs):
        name = getattr(load_many, "__qualname__", repr(load_many))
        params = ", ".join(inspect.signature(load_many).parameters)
        raise ConfigurationError(
            f"load_many {name}({params}) must take exactly one argument: get_many_cached calls "
            "it with the list of keys no tier holds and expects {key: value} back"
        )


def check_tier_order(tiers: Sequence[Any]) -> None:
    """Tiers are listed fastest first: every in-process tier before every shared one."""
    shared = None
    for tier in tiers:
        if not getattr(tier, "in_process", False):
            shared = shared or tier
        elif shared is not None:
            raise ConfigurationError(
                f"tiers are listed fastest first, but the in-process tier {tier!r} comes after "
                f"{shared!r}; put it first, e.g. TieredCache([MemoryTier(...), RedisTier(...)])"
            )


def closed_error() -> CacheClosedError:
    """What using a closed cache raises (its shared tiers are closed and stay closed)."""
    return CacheClosedError(
        "this TieredCache was closed (aclose() or sync.close()) and is used again; close a cache "
        "once, when the program (or the app's lifespan) ends, or build a new one"
    )
