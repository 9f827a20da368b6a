"""``@tiered_cache``: one specialised closure per decorated function, with the L1 hit inline.

The wrapper built here does, on a hit, exactly: build the key (a generated function with the
decorated function's own signature, so Python binds the arguments), one dict lookup in the L1
tier, one clock comparison. Everything else -- key validation, policy, the flow -- happens only
on a miss, in the shared drivers.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import string
import typing
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from decimal import Decimal
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, overload

import orjson

from . import _async, _sync
from ._cache import _UNSET, TieredCache
from ._errors import ConfigurationError, InvalidKeyError
from ._keys import check_key
from ._policy import Policy

__all__ = ["AsyncCachedFunction", "CachedFunction", "tiered_cache"]

P = ParamSpec("P")
R = TypeVar("R")


class CachedFunction(Protocol[P, R]):
    """What ``@tiered_cache`` makes of a plain function (for type checkers)."""

    uncached: Callable[P, R]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None: ...

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str: ...


class AsyncCachedFunction(Protocol[P, R]):
    """What ``@tiered_cache`` makes of a coroutine function (for type checkers)."""

    uncached: Callable[P, Awaitable[R]]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, None]: ...

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str: ...


class _Decorator(Generic[P, R]):
    """The decorator returned by ``tiered_cache(...)``."""

    def __init__(
        self, cache: TieredCache, key: str | None, overrides: dict[str, Any], value_type: Any
    ) -> None:
        if not isinstance(cache, TieredCache):
            raise ConfigurationError("tiered_cache needs a TieredCache as its first argument")
        self._cache = cache
        self._template = key
        self._overrides = overrides
        self._value_type = value_type
        cache.policy_for(**overrides)  # validate the options now, not on the first miss

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> AsyncCachedFunction[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> CachedFunction[P, R]: ...

    def __call__(self, fn: Callable[..., Any]) -> Any:
        make_key = build_key_function(fn, self._template, self._cache.namespace + ":")
        resolve_policy = _policy_resolver(self._cache, fn, self._overrides, self._value_type)
        if inspect.iscoroutinefunction(fn):
            return _async_wrapper(fn, self._cache, make_key, resolve_policy)
        return _sync_wrapper(fn, self._cache, make_key, resolve_policy)


def tiered_cache(
    cache: TieredCache,
    *,
    ttl: float | None = None,
    key: str | None = None,
    tags: Iterable[str] | None = None,
    stale_ttl: float | None = None,
    value_type: Any = _UNSET,
    **options: Any,
) -> _Decorator[Any, Any]:
    """Cache a function's results in ``cache``; works on ``def`` and ``async def`` alike.

    ``key`` is a template over the function's parameters (``"user:{user_id}"``, defaults applied;
    attribute and index lookups as in ``str.format``). Without it the key is the function's module
    and qualified name plus a stable hash of its arguments (``self``/``cls`` excluded); arguments
    must then be JSON-like (numbers, strings, lists, dicts, dates, UUIDs, dataclasses...).
    ``value_type`` defaults to the return annotation: values read back from a remote tier are
    rebuilt as that type. Other keywords are per-call options of ``get_cached``.
    """
    overrides = dict(options, ttl=ttl, stale_ttl=stale_ttl, tags=tags)
    return _Decorator(cache, key, overrides, value_type)


def _policy_resolver(
    cache: TieredCache, fn: Callable[..., Any], overrides: dict[str, Any], value_type: Any
) -> Callable[[], Policy]:
    """Resolve the policy on first use (return annotations may be forward references)."""
    resolved: list[Policy] = []

    def resolve() -> Policy:
        if resolved:
            return resolved[0]
        vt = value_type
        if vt is _UNSET:
            try:
                vt = typing.get_type_hints(fn).get("return", _UNSET)
            except Exception:  # unresolvable annotation: values come back JSON-shaped
                vt = _UNSET
        policy = cache.policy_for(value_type=vt, **overrides)
        resolved.append(policy)
        return policy

    return resolve


def _sync_wrapper(
    fn: Callable[..., Any],
    cache: TieredCache,
    make_key: Callable[..., str],
    resolve_policy: Callable[[], Policy],
) -> Any:
    rt = cache._rt
    clock = rt.clock
    lookup = getattr(rt.tiers[0], "fast_lookup", None) if rt.l1 else None

    if lookup is not None:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = make_key(*args, **kwargs)
            slot = lookup(key)
            if slot is not None:
                entry = slot.entry
                if entry.fresh_until > clock():
                    slot.visited = True
                    return entry.value
            return _sync.get_cached(
                rt, check_key(key), functools.partial(fn, *args, **kwargs), resolve_policy()
            )
    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = make_key(*args, **kwargs)
            return _sync.get_cached(
                rt, check_key(key), functools.partial(fn, *args, **kwargs), resolve_policy()
            )

    def invalidate(*args: Any, **kwargs: Any) -> None:
        _sync.delete(rt, check_key(make_key(*args, **kwargs)))

    return _finish(wrapper, fn, make_key, invalidate)


def _async_wrapper(
    fn: Callable[..., Any],
    cache: TieredCache,
    make_key: Callable[..., str],
    resolve_policy: Callable[[], Policy],
) -> Any:
    rt = cache._rt
    clock = rt.clock
    lookup = getattr(rt.tiers[0], "fast_lookup", None) if rt.l1 else None

    if lookup is not None:

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = make_key(*args, **kwargs)
            slot = lookup(key)
            if slot is not None:
                entry = slot.entry
                if entry.fresh_until > clock():
                    slot.visited = True
                    return entry.value
            return await _async.get_cached(
                rt, check_key(key), functools.partial(fn, *args, **kwargs), resolve_policy()
            )
    else:

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = make_key(*args, **kwargs)
            return await _async.get_cached(
                rt, check_key(key), functools.partial(fn, *args, **kwargs), resolve_policy()
            )

    async def invalidate(*args: Any, **kwargs: Any) -> None:
        await _async.delete(rt, check_key(make_key(*args, **kwargs)))

    return _finish(wrapper, fn, make_key, invalidate)


def _finish(
    wrapper: Any, fn: Callable[..., Any], make_key: Callable[..., str], invalidate: Callable[..., Any]
) -> Any:
    functools.update_wrapper(wrapper, fn)
    wrapper.uncached = fn
    wrapper.invalidate = invalidate
    wrapper.cache_key = make_key
    return wrapper


# --- key functions ------------------------------------------------------------------------------

_FIELD_ROOT = re.compile(r"[.\[]")


def build_key_function(fn: Callable[..., Any], template: str | None, prefix: str) -> Callable[..., str]:
    """Generate ``def _key(<fn's parameters>): return <full key>`` so that calling it binds the
    arguments exactly as calling ``fn`` would (defaults applied, errors identical)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the signature of {fn!r}: {exc}") from None
    params = list(sig.parameters.values())
    namespace: dict[str, Any] = {"__tc_prefix": prefix}
    header: list[str] = []
    star_seen = False
    last_positional_only = max((i for i, p in enumerate(params) if p.kind is p.POSITIONAL_ONLY), default=-1)
    for i, p in enumerate(params):
        default = ""
        if p.default is not p.empty:
            namespace[f"__tc_default_{i}"] = p.default
            default = f"=__tc_default_{i}"
        if p.kind is p.VAR_POSITIONAL:
            header.append(f"*{p.name}")
            star_seen = True
        elif p.kind is p.VAR_KEYWORD:
            header.append(f"**{p.name}")
        elif p.kind is p.KEYWORD_ONLY:
            if not star_seen:
                header.append("*")
                star_seen = True
            header.append(p.name + default)
        else:
            header.append(p.name + default)
        if i == last_positional_only:
            header.append("/")
    names = [p.name for p in params]

    if template is not None:
        if not isinstance(template, str) or not template:
            raise ConfigurationError("key must be a non-empty template string")
        used: list[str] = []
        for _, field, _, _ in string.Formatter().parse(template):
            if field is None:
                continue
            root = _FIELD_ROOT.split(field, 1)[0]
            if not root or root.isdigit():
                raise ConfigurationError(f"key template {template!r}: use parameter names, not {{{field}}}")
            if root not in names:
                raise ConfigurationError(
                    f"key template {template!r} names {root!r}, which is not a parameter of "
                    f"{fn.__qualname__}{sig}"
                )
            if root not in used:
                used.append(root)
        namespace["__tc_format"] = template.format
        body = "__tc_prefix + __tc_format(" + ", ".join(f"{n}={n}" for n in used) + ")"
    else:
        hashed = [p for p in params if not (p is params[0] and p.name in ("self", "cls"))]
        base = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}:"
        namespace["__tc_prefix"] = prefix + base
        namespace["__tc_hash"] = stable_hash
        body = "__tc_prefix + __tc_hash((" + "".join(f"{p.name}, " for p in hashed) + "))"

    source = f"def __tc_key({', '.join(header)}):\n    return {body}\n"
    exec(source, namespace)
    key_fn: Callable[..., str] = namespace["__tc_key"]
    key_fn.__qualname__ = f"{getattr(fn, '__qualname__', 'fn')}.cache_key"
    return key_fn


def _key_default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return {"$decimal": str(obj)}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$bytes": bytes(obj).hex()}
    if isinstance(obj, (set, frozenset)):
        return {"$set": sorted(orjson.dumps(x, default=_key_default, option=_KEY_OPTIONS) for x in obj)}
    dump = getattr(obj, "model_dump", None)
    if dump is not None and callable(dump):
        return dump(mode="json")
    raise TypeError(type(obj).__qualname__)


_KEY_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def stable_hash(args: tuple[Any, ...]) -> str:
    """A hash of the arguments that is the same in every process and on every run.

    Built from their JSON form (so ``f(1, 2)`` and ``f("1 2")`` differ, as do 1, 1.0, "1" and
    True), never from ``repr``/``hash`` (memory addresses, per-process string hashing).
    """
    try:
        raw = orjson.dumps(args, default=_key_default, option=_KEY_OPTIONS)
    except TypeError as exc:
        raise InvalidKeyError(
            f"cannot build a stable cache key from an argument of type {exc}; give the decorator "
            "a key= template, or pass JSON-like arguments"
        ) from None
    return hashlib.blake2b(raw, digest_size=16).hexdigest()
