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
import sys
import typing
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, ParamSpec, Protocol, TypeVar, overload

import orjson

from . import _async, _sync
from ._cache import _UNSET, Lookup, TieredCache
from ._errors import ConfigurationError, InvalidKeyError, SerializationError
from ._keys import check_key
from ._policy import Policy
from ._serde import converter_for, encode_key_args
from ._tier import InlineL1
from ._ttl import Duration

__all__ = [
    "AsyncCachedFunction",
    "AsyncCachedManyFunction",
    "CachedFunction",
    "CachedManyFunction",
    "CachedMethod",
    "tiered_cache",
    "tiered_cache_many",
]

P = ParamSpec("P")
R = TypeVar("R")


class CachedFunction(Protocol[P, R]):
    """What ``@tiered_cache`` makes of a plain function (for type checkers)."""

    uncached: Callable[P, R]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Delete this call's entry from every tier (and other processes' L1)."""
        ...

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The full key (``namespace:...``) this call is cached under."""
        ...

    def lookup(self, *args: P.args, **kwargs: P.kwargs) -> Lookup:
        """The call's result with where it came from ("L1", "L2", "LOADED", ...)."""
        ...


class AsyncCachedFunction(Protocol[P, R]):
    """What ``@tiered_cache`` makes of a coroutine function (for type checkers)."""

    uncached: Callable[P, Awaitable[R]]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, None]:
        """Delete this call's entry from every tier (and other processes' L1)."""
        ...

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The full key (``namespace:...``) this call is cached under."""
        ...

    def lookup(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, Lookup]:
        """The call's result with where it came from ("L1", "L2", "LOADED", ...)."""
        ...


class _Decorator:
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

    @overload
    def __call__(self, fn: classmethod[Any, P, R]) -> Any: ...  # binds like a classmethod

    def __call__(self, fn: Callable[..., Any] | classmethod[Any, Any, Any]) -> Any:
        if isinstance(fn, staticmethod):
            raise ConfigurationError("put @tiered_cache below @staticmethod (apply it to the function)")
        # Above @classmethod: the cached function binds to the class itself, on every Python
        # (3.13 no longer lets a classmethod bind the descriptor it wraps, see CachedMethod).
        on_class = False
        if isinstance(fn, classmethod):
            fn, on_class = fn.__func__, True
        caller = sys._getframe(1)
        value_type = self._value_type
        # A memory-only cache never encodes values: any annotation will do there.
        strict = bool(self._cache._rt.remote)
        if value_type is _UNSET:
            value_type = _return_annotation(fn, caller.f_locals, strict)
        elif value_type is not None and not _converter_or_error(fn, value_type, strict):
            value_type = _UNSET
        resolve = _policy_resolver(self._cache, fn, self._overrides, value_type)
        wrapper = build_cached_function(fn, self._cache, self._template, resolve, self._overrides)
        kind = "cls" if on_class else _method_kind(fn)
        if kind is None:
            return wrapper
        return CachedMethod(
            wrapper, kind, needs_hook=kind == "self" and self._template is None, on_class=on_class
        )


def tiered_cache(
    cache: TieredCache,
    *,
    ttl: Duration | None = None,
    key: str | None = None,
    tags: Iterable[str] | None = None,
    stale_ttl: Duration | None = None,
    value_type: Any = _UNSET,
    **options: Any,
) -> _Decorator:
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


class _Deferred:
    """A return annotation naming something not defined yet (a class further down the module)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _return_annotation(fn: Callable[..., Any], localns: dict[str, Any], strict: bool = True) -> Any:
    """The return annotation, resolved now (with the decorating scope's names, so PEP 563 and
    local classes work). An annotation that can never resolve is a ConfigurationError here; one
    naming a module-level name not defined yet is retried on first use."""
    annotations = getattr(fn, "__annotations__", None) or {}
    if "return" not in annotations:
        return _UNSET
    try:
        hints = typing.get_type_hints(fn, localns=localns, include_extras=True)
    except NameError as exc:
        if "<locals>" in getattr(fn, "__qualname__", "") and not localns.get("__module__"):
            raise _unresolvable(fn, exc) from None
        return _Deferred(exc)  # maybe defined later in the module or class body
    except Exception as exc:
        raise _unresolvable(fn, exc) from None
    tp = hints.get("return", _UNSET)
    if tp is not _UNSET and not _converter_or_error(fn, tp, strict):
        return _UNSET
    return tp


def _unresolvable(fn: Callable[..., Any], exc: Exception) -> ConfigurationError:
    return ConfigurationError(
        f"cannot resolve the return annotation of {getattr(fn, '__qualname__', fn)} ({exc}); values "
        "read back from other tiers would lose their type. Import the type at runtime (not only "
        "under TYPE_CHECKING), or pass value_type="
    )


def _converter_or_error(fn: Callable[..., Any], tp: Any, strict: bool = True) -> bool:
    """Can values of ``tp`` be rebuilt from a remote tier? False, or ConfigurationError if
    ``strict`` (the cache has remote tiers)."""
    try:
        converter_for(tp)
    except SerializationError as exc:
        if not strict:
            return False
        raise ConfigurationError(
            f"the return type of {getattr(fn, '__qualname__', fn)} cannot be cached: {exc}"
        ) from None
    return True


def _policy_resolver(
    cache: TieredCache, fn: Callable[..., Any], overrides: dict[str, Any], value_type: Any
) -> Callable[[], Policy]:
    """Resolve the policy on first use (a deferred return annotation is resolved then)."""
    resolved: list[Policy] = []

    def resolve() -> Policy:
        if resolved:
            return resolved[0]
        vt = value_type
        if isinstance(vt, _Deferred):
            try:
                vt = typing.get_type_hints(fn, include_extras=True).get("return", _UNSET)
            except Exception as exc:
                raise _unresolvable(fn, exc) from None
            if not _converter_or_error(fn, vt, bool(cache._rt.remote)):
                vt = _UNSET
        policy = cache.policy_for(value_type=vt, **overrides)
        resolved.append(policy)
        return policy

    return resolve


_SYNC_TEMPLATE = """
def __tc_build(__tc_lookup, __tc_clock, __tc_slow, __tc_fn, __tc_tags_ok, __tc_seen{defaults}):
    def {name}({header}):
        __tc_key = {key_expr}
        __tc_slot = __tc_lookup(__tc_key)
        if __tc_slot is not None:
            __tc_entry = __tc_slot.entry
            if __tc_entry.fresh_until > __tc_clock() and (
                not __tc_entry.tags or __tc_tags_ok(__tc_entry) is True
            ):
                {mark_hit}
                return __tc_entry.value
        return __tc_slow(__tc_key, __tc_partial(__tc_fn, {call}))
    return {name}
"""

_ASYNC_TEMPLATE = """
def __tc_build(__tc_lookup, __tc_clock, __tc_slow, __tc_fn, __tc_tags_ok, __tc_seen{defaults}):
    async def {name}({header}):
        __tc_key = {key_expr}
        __tc_slot = __tc_lookup(__tc_key)
        if __tc_slot is not None:
            __tc_entry = __tc_slot.entry
            if __tc_entry.fresh_until > __tc_clock() and (
                not __tc_entry.tags or __tc_tags_ok(__tc_entry) is True
            ):
                {mark_hit}
                return __tc_entry.value
        return await __tc_slow(__tc_key, __tc_partial(__tc_fn, {call}))
    return {name}
"""

_NO_L1_SYNC_TEMPLATE = """
def __tc_build(__tc_lookup, __tc_clock, __tc_slow, __tc_fn, __tc_tags_ok, __tc_seen{defaults}):
    def {name}({header}):
        return __tc_slow({key_expr}, __tc_partial(__tc_fn, {call}))
    return {name}
"""

_NO_L1_ASYNC_TEMPLATE = """
def __tc_build(__tc_lookup, __tc_clock, __tc_slow, __tc_fn, __tc_tags_ok, __tc_seen{defaults}):
    async def {name}({header}):
        return await __tc_slow({key_expr}, __tc_partial(__tc_fn, {call}))
    return {name}
"""

_KEY_TEMPLATE = """
def __tc_build({defaults_only}):
    def cache_key({header}):
        return {key_expr}
    return cache_key
"""


def build_cached_function(
    fn: Callable[..., Any],
    cache: TieredCache,
    template: str | None,
    resolve_policy: Callable[[], Policy],
    overrides: dict[str, Any],
) -> Any:
    """Generate the wrapper: the decorated function's own parameters, the key built inline, the L1
    lookup inline, and a call into the shared driver only on a miss."""
    spec = _Signature(fn, cache.namespace + ":", template)
    rt = cache._rt
    early = cache.policy_for(**overrides).early_refresh  # needs the driver on every hit
    first = rt.tiers[0]
    inline = first if isinstance(first, InlineL1) and rt.l1 and not early else None
    lookup = inline.fast_lookup if inline is not None else None
    is_async = inspect.iscoroutinefunction(fn)
    if is_async:
        source = _ASYNC_TEMPLATE if lookup is not None else _NO_L1_ASYNC_TEMPLATE

        async def slow_async(key: str, loader: Callable[[], Any]) -> Any:
            return (await _async.get_cached(rt, check_key(key), loader, resolve_policy())).value

        slow: Callable[[str, Callable[[], Any]], Any] = slow_async
    else:
        source = _SYNC_TEMPLATE if lookup is not None else _NO_L1_SYNC_TEMPLATE

        def slow_sync(key: str, loader: Callable[[], Any]) -> Any:
            return _sync.get_cached(rt, check_key(key), loader, resolve_policy()).value

        slow = slow_sync
    metrics = cache._metrics
    # One specialised body per option set. The SIEVE mark is the hit count (adapters/memory.py):
    # counting moves the slot to its next mark, not counting stores the tier's "visited" mark.
    seen = inline.marks[1] if inline is not None else None
    wrapper = spec.compile(
        source.replace(
            "{mark_hit}",
            "__tc_slot.visited = __tc_slot.visited.next" if metrics else "__tc_slot.visited = __tc_seen",
        ),
        lookup,
        rt.clock,
        slow,
        fn,
        rt.coherence.tags_valid_locally,
        seen,
    )
    make_key = spec.compile(_KEY_TEMPLATE)

    if is_async:

        async def ainvalidate(*args: Any, **kwargs: Any) -> None:
            await _async.delete(rt, check_key(make_key(*args, **kwargs)))

        invalidate: Callable[..., Any] = ainvalidate
    else:

        def invalidate(*args: Any, **kwargs: Any) -> None:
            _sync.delete(rt, check_key(make_key(*args, **kwargs)))

    if is_async:

        async def alookup(*args: Any, **kwargs: Any) -> Lookup:
            key = check_key(make_key(*args, **kwargs))
            outcome = await _async.get_cached(rt, key, lambda: fn(*args, **kwargs), resolve_policy())
            return Lookup.of(outcome)

        lookup_fn: Callable[..., Any] = alookup
    else:

        def lookup_fn(*args: Any, **kwargs: Any) -> Lookup:
            key = check_key(make_key(*args, **kwargs))
            outcome = _sync.get_cached(rt, key, lambda: fn(*args, **kwargs), resolve_policy())
            return Lookup.of(outcome)

    functools.update_wrapper(wrapper, fn)
    wrapper.uncached = fn
    wrapper.invalidate = invalidate
    wrapper.cache_key = make_key
    wrapper.lookup = lookup_fn
    return wrapper


# --- code generation for keys and wrappers --------------------------------------------------------

_FIELD_ROOT = re.compile(r"[.\[]")
_SAFE_SPEC = re.compile(r"[^'\"\\{}\n\r]*")  # a format spec that can sit in an f-string


class _Signature:
    """The decorated function's parameters as source text, and its key expression."""

    def __init__(self, fn: Callable[..., Any], prefix: str, template: str | None) -> None:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the signature of {fn!r}: {exc}") from None
        params = list(sig.parameters.values())
        if any(p.name.startswith("__tc_") for p in params):
            raise ConfigurationError("parameter names starting with '__tc_' are reserved")
        self.name = fn.__name__ if getattr(fn, "__name__", "").isidentifier() else "cached"
        self.names = [p.name for p in params]
        self.defaults: dict[str, Any] = {}
        # functools.partial, not a lambda, for the miss path's loader: a lambda would make every
        # parameter a closure cell, which costs on every call, hits included.
        self.env: dict[str, Any] = {"__tc_prefix": prefix, "__tc_partial": functools.partial}
        header: list[str] = []
        call: list[str] = []
        star_seen = False
        positional_only = [i for i, p in enumerate(params) if p.kind is p.POSITIONAL_ONLY]
        last_positional_only = positional_only[-1] if positional_only else -1
        for i, p in enumerate(params):
            default = ""
            if p.default is not p.empty:
                self.defaults[f"__tc_default_{i}"] = p.default
                default = f"=__tc_default_{i}"
            if p.kind is p.VAR_POSITIONAL:
                header.append(f"*{p.name}")
                call.append(f"*{p.name}")
                star_seen = True
            elif p.kind is p.VAR_KEYWORD:
                header.append(f"**{p.name}")
                call.append(f"**{p.name}")
            elif p.kind is p.KEYWORD_ONLY:
                if not star_seen:
                    header.append("*")
                    star_seen = True
                header.append(p.name + default)
                call.append(f"{p.name}={p.name}")
            else:
                header.append(p.name + default)
                call.append(p.name)  # positionally: valid whatever follows (even *args)
            if i == last_positional_only:
                header.append("/")
        self.header = ", ".join(header)
        self.call = ", ".join(call)
        if template is not None:
            self.key_expr = self._template_expression(fn, sig, template)
        else:
            # A method's instance is part of the key: its __cache_key__(), or for a classmethod
            # the class's qualified name (Repo("a").find(1) and Repo("b").find(1) never share).
            kind = _method_kind(fn)
            parts = [p.name for p in params]
            if kind == "self":
                self.env["__tc_instance"] = instance_key
                parts[0] = f"__tc_instance({parts[0]})"
            elif kind == "cls":
                self.env["__tc_instance"] = class_key
                parts[0] = f"__tc_instance({parts[0]})"
            qualified = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}:"
            self.env["__tc_prefix"] = prefix + qualified
            self.env["__tc_hash"] = stable_hash
            hashed = "__tc_prefix + __tc_hash((" + "".join(f"{p}, " for p in parts) + "))"
            plain = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if kind is None and 1 <= len(params) <= 2 and len(plain) == len(params):
                # Ids are the common argument: one or two 64-bit ints (bool is not int here) are
                # written as stable_hash would write them ("[42]", "[1,2]"), with no call.
                self.env["__tc_int"] = int
                test = " and ".join(
                    f"{n}.__class__ is __tc_int and {_INT_MIN} <= {n} <= {_INT_MAX}" for n in plain
                )
                text = ",".join(f"{{{n}}}" for n in plain)
                literal = repr(prefix + qualified)  # adjacent to the f-string: one constant
                self.key_expr = f'({literal} f"[{text}]" if {test} else {hashed})'
            else:
                self.key_expr = hashed

    def _template_expression(self, fn: Callable[..., Any], sig: inspect.Signature, template: str) -> str:
        """The template as an f-string (fast), or a ``str.format`` call when it cannot be one."""
        if not isinstance(template, str) or not template:
            raise ConfigurationError("key must be a non-empty template string")
        pieces = [repr(self.env["__tc_prefix"])]
        used: list[str] = []
        as_fstring = True
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ConfigurationError(
                f"key template {template!r} is not a valid template ({exc}); write each parameter "
                'as {name}, e.g. key="user:{user_id}", and a literal brace as {{ or }}'
            ) from None
        # Field values are escaped so that no two argument tuples share a key: each separator
        # after a field (its first character) and the escape character are percent-encoded in
        # the value, so the text after a field always starts where the value ends.
        separators = {"%"}
        for i, (_, field, _, _) in enumerate(parsed):
            if field is None:
                continue
            following = parsed[i + 1][0] if i + 1 < len(parsed) else ""
            if i + 1 < len(parsed) and not following:
                raise ConfigurationError(
                    f"key template {template!r}: put a separator between fields (e.g. "
                    "'{a}:{b}'), or two different argument pairs would share one key"
                )
            if following:
                # Any character can separate: escapes are fixed-length (%XX, %uXXXXXX), so the
                # first unescaped occurrence of the separator is where the field's text ends.
                separators.add(following[0])
        escape = _escaper(frozenset(separators))
        digits_safe = not separators & set("-0123456789")  # no int's text can hold a separator
        self.env["__tc_esc"] = escape
        self.env["__tc_int"] = int
        for literal, field, spec, conversion in parsed:
            if literal:
                pieces.append("f" + repr(literal.replace("{", "{{").replace("}", "}}")))
            if field is None:
                continue
            root = _FIELD_ROOT.split(field, 1)[0]
            if not root or root.isdigit():
                raise ConfigurationError(f"key template {template!r}: use parameter names, not {{{field}}}")
            if root not in self.names:
                raise ConfigurationError(
                    f"key template {template!r} names {root!r}, which is not a parameter of "
                    f"{getattr(fn, '__qualname__', fn)}{sig}"
                )
            if root not in used:
                used.append(root)
            expr = _field_expression(field)
            if expr is None or not _SAFE_SPEC.fullmatch(spec or ""):
                as_fstring = False
                continue
            if not conversion and not spec:  # the common case: escaped inline, one f-string
                if expr.isidentifier():  # a plain parameter: an int skips the call
                    safe_int = f"{expr}.__class__ is __tc_int" + ("" if digits_safe else f" and {expr} >= 0")
                    pieces.append(f'f"{{{expr} if {safe_int} else __tc_esc({expr})}}"')
                else:
                    pieces.append('f"{__tc_esc(' + expr + ')}"')
                continue
            if "'" in expr:
                as_fstring = False
                continue
            conv = f"!{conversion}" if conversion else ""
            pieces.append("f\"{__tc_esc(f'{" + expr + conv + (":" + spec if spec else "") + "}')}\"")
        if as_fstring:
            return " ".join(pieces)
        self.env["__tc_format"] = functools.partial(_EscapingFormatter(escape).format, template)
        return "__tc_prefix + __tc_format(" + ", ".join(f"{n}={n}" for n in used) + ")"

    def compile(self, source: str, *args: Any) -> Any:
        text = source.format(
            name=self.name,
            header=self.header,
            call=self.call,
            key_expr=self.key_expr,
            defaults="".join(f", {d}" for d in self.defaults),
            defaults_only=", ".join(self.defaults),
        )
        env = dict(self.env)
        exec(text, env)  # the source is built from parameter names and a parsed template only
        return env["__tc_build"](*args, *self.defaults.values())


def _escaper(chars: frozenset[str]) -> Callable[[Any], Any]:
    """``s`` with each of ``chars`` (always including ``%``) as ``%XX`` (``%uXXXXXX`` beyond
    Latin-1): injective, and outside its fixed-length escapes the text holds none of ``chars``."""
    table = {ord(c): (f"%{ord(c):02X}" if ord(c) < 256 else f"%u{ord(c):06X}") for c in chars}
    ordered = sorted(chars, key=lambda c: c != "%")  # "%" first: escapes must not be re-escaped
    digits_safe = not (set(ordered) & set("-0123456789"))

    def escape(value: Any) -> Any:
        # Takes the field's value (or its formatted text): an int whose digits cannot hold a
        # separator is returned as is, for the f-string to format; anything else as escaped text.
        t = type(value)
        if t is int and (digits_safe or value >= 0):
            return value
        text = value if t is str else format(value)
        for c in ordered:
            if c in text:
                return text.translate(table)
        return text

    return escape


class _EscapingFormatter(string.Formatter):
    """``str.format`` with every field's text escaped (templates an f-string cannot express)."""

    def __init__(self, escape: Callable[[Any], Any]) -> None:
        self._escape = escape

    def format_field(self, value: Any, format_spec: str) -> str:
        return str(self._escape(super().format_field(value, format_spec)))


_FIELD_PART = re.compile(r"\.([^.\[]+)|\[([^\]]+)\]")


def _field_expression(field: str) -> str | None:
    """``a.b[0][k]`` (str.format syntax: ``[k]`` is the string 'k') as a Python expression, or
    None when it cannot be written inside a double-quoted f-string (then str.format is used)."""
    root = _FIELD_ROOT.split(field, 1)[0]
    expr, pos = root, len(root)
    while pos < len(field):
        match = _FIELD_PART.match(field, pos)
        if match is None:
            return None
        attr, index = match.groups()
        if attr is not None:
            if not attr.isidentifier():
                return None
            expr += f".{attr}"
        else:
            expr += f"[{int(index)}]" if index.isdigit() else f"[{index!r}]"
        pos = match.end()
    if '"' in expr or "\\" in expr:
        return None
    return expr


_HASH_PLAIN = frozenset({str, int, bool, type(None)})
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1  # JSON's ints in the typed form; beyond: {"$int": ..}


def stable_hash(args: tuple[Any, ...]) -> str:
    """A digest of the arguments that is the same in every process and on every run.

    Built from their typed canonical JSON form (the tagged form of ``tiercache._serde``: ``f(1, 2)``
    and ``f("1 2")`` differ, as do 1, 1.0, "1" and True, ``{1: "a"}`` and ``{"1": "a"}``, a UUID,
    a date or a Decimal and its string), never from ``repr``/``hash`` (memory addresses,
    per-process string hashing). Short forms (up to 48 bytes) are used as they are -- readable in
    Redis, and cheaper than a hash on the hit path; longer ones become a 128-bit BLAKE2b digest.
    """
    for a in args:
        t = type(a)
        if t not in _HASH_PLAIN and (t is not float or a - a != 0.0):  # NaN/inf: refused below
            break
    else:  # strings, ints, bools, None, finite floats: their plain JSON is already the typed form
        try:
            raw = orjson.dumps(args)
        except TypeError:  # an int beyond 64 bits (tagged below), a lone surrogate
            pass
        else:
            return raw.decode() if len(raw) <= 48 else "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()
    flat = _flat_tuples(args)
    if flat is not None:
        try:
            raw = orjson.dumps(flat)
        except TypeError:
            pass
        else:
            return raw.decode() if len(raw) <= 48 else "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()
    try:
        raw = orjson.dumps(encode_key_args(args), option=orjson.OPT_SORT_KEYS)
    except (SerializationError, TypeError) as exc:
        raise InvalidKeyError(
            f"cannot build a stable cache key from these arguments ({exc}); give the decorator a "
            'key= template naming the parameters that identify a call (key="user:{user_id}"), or '
            "pass JSON-like arguments (numbers, strings, dates, UUIDs, dataclasses, lists, dicts)"
        ) from None
    if len(raw) <= 48:
        return raw.decode()
    return "#" + hashlib.blake2b(raw, digest_size=16).hexdigest()


def _plain(a: Any) -> bool:
    t = type(a)
    return t in _HASH_PLAIN or (t is float and a - a == 0.0)


def _flat_tuples(args: tuple[Any, ...]) -> list[Any] | None:
    """The typed form of arguments that are plain values or flat tuples of them (a composite id),
    built directly; None for anything else."""
    out: list[Any] = []
    for a in args:
        if _plain(a):
            out.append(a)
        elif type(a) is tuple and all(map(_plain, a)):
            out.append({"$tuple": list(a)})
        else:
            return None
    return out


def instance_key(obj: Any) -> Any:
    """The part of a method's default key that names its instance: ``obj.__cache_key__()``."""
    hook = getattr(obj, "__cache_key__", None)
    if hook is None:
        raise ConfigurationError(
            f"{type(obj).__qualname__} has no __cache_key__: the default key of a cached method must "
            "name its instance. Define __cache_key__(self) returning what identifies the instance "
            "(e.g. its database name), or give the decorator a key= template using {self.attr}"
        )
    return ["$instance", hook()]


def class_key(cls: Any) -> str:
    """The part of a classmethod's default key that names its class."""
    return f"$class:{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"


def _method_kind(fn: Callable[..., Any]) -> str | None:
    """ "self" or "cls" when ``fn`` is defined in a class and takes its instance/class first."""
    qualname = getattr(fn, "__qualname__", "")
    if "." not in qualname or qualname.rsplit(".", 2)[-2] == "<locals>":
        return None
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if (
        params
        and params[0].name in ("self", "cls")
        and params[0].kind
        in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
    ):
        return params[0].name
    return None


class CachedMethod:
    """A cached method: binds like a function, and binds ``invalidate``, ``cache_key`` and
    ``lookup`` too (``repo.find.invalidate(1)``), which a plain function attribute cannot."""

    def __init__(self, wrapper: Any, kind: str, *, needs_hook: bool, on_class: bool = False) -> None:
        self._wrapper = wrapper
        self._kind = kind
        self._needs_hook = needs_hook
        self._on_class = on_class
        functools.update_wrapper(self, wrapper)
        if inspect.iscoroutinefunction(wrapper):
            # inspect.iscoroutinefunction(Repo.get) reads these off a function-like object
            self.__code__ = wrapper.__code__
            self.__defaults__ = wrapper.__defaults__
            self.__kwdefaults__ = wrapper.__kwdefaults__
        self.uncached = wrapper.uncached
        self.invalidate = wrapper.invalidate
        self.cache_key = wrapper.cache_key
        self.lookup = wrapper.lookup
        if kind == "cls" and not on_class:
            # Below @classmethod, C.m binds through __get__ up to Python 3.12; from 3.13 on C.m is
            # a plain method of this object, and C.m.invalidate(1) would reach these with 1 as
            # the class: a wrong key, silently. Refuse instead.
            self.uncached = self.invalidate = self.cache_key = self.lookup = self._needs_class

    def __set_name__(self, owner: type, name: str) -> None:
        # The class exists now (bases included): a default key needs its __cache_key__.
        if self._needs_hook and getattr(owner, "__cache_key__", None) is None:
            raise ConfigurationError(
                f"{owner.__qualname__}.{name}: the default cache key of a method must name its "
                f"instance, and {owner.__qualname__} has no __cache_key__. Define "
                "__cache_key__(self) (e.g. returning the database name), or give the decorator a "
                "key= template using {self.attr}"
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapper(*args, **kwargs)

    def _needs_class(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigurationError(
            f"{self._wrapper.__qualname__} was reached without its class (Python 3.13+ no longer "
            "binds what @classmethod wraps): put @tiered_cache above @classmethod to use "
            "C.method.invalidate/cache_key/lookup"
        )

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if self._on_class:
            return _BoundCachedMethod(self._wrapper, objtype if objtype is not None else type(obj))
        if obj is None:
            return self
        return _BoundCachedMethod(self._wrapper, obj)


class _BoundCachedMethod:
    """``instance.method`` of a CachedMethod."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, wrapper: Any, obj: Any) -> None:
        self.__func__ = wrapper
        self.__self__ = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__.invalidate(self.__self__, *args, **kwargs)

    def cache_key(self, *args: Any, **kwargs: Any) -> str:
        return self.__func__.cache_key(self.__self__, *args, **kwargs)  # type: ignore[no-any-return]

    def lookup(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__.lookup(self.__self__, *args, **kwargs)

    def uncached(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__.uncached(self.__self__, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # the method's own, without self
        sig = inspect.signature(self.__func__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__func__, name)

    def __repr__(self) -> str:
        return f"<bound cached method {self.__func__.__qualname__} of {self.__self__!r}>"


def tiered_cache_many(
    cache: TieredCache,
    *,
    key: str,
    ttl: Duration | None = None,
    tags: Iterable[str] | None = None,
    stale_ttl: Duration | None = None,
    value_type: Any = _UNSET,
    **options: Any,
) -> _ManyDecorator:
    """Cache a function that loads many items at once: ``fn(ids) -> {id: value}``.

    ``key`` is a template with one ``{}`` for an id (``"user:{}"``). The decorated function takes
    an iterable of ids and returns ``{id: value}`` for those it found; it is called once per call,
    with only the ids that no tier holds (``get_many_cached``). Ids it leaves out are simply absent
    from the result. Works on ``def`` and ``async def``; ``value_type`` defaults to the ``V`` of a
    ``Mapping[K, V]`` return annotation.
    """
    if not isinstance(key, str) or "{}" not in key:
        raise ConfigurationError('tiered_cache_many needs key= with one "{}" for the id, e.g. "user:{}"')
    policy_options = dict(options, ttl=ttl, stale_ttl=stale_ttl, tags=tags)
    cache.policy_for(**policy_options)  # validate now

    def decorate(fn: Callable[[list[Any]], Any]) -> Any:
        vt = value_type
        if vt is _UNSET:
            strict = bool(cache._rt.remote)
            ret = _return_annotation(fn, sys._getframe(1).f_locals, strict)
            if isinstance(ret, _Deferred):
                raise _unresolvable(fn, ret.error)
            args = typing.get_args(ret) if ret is not _UNSET else ()
            vt = args[1] if len(args) == 2 else _UNSET
            if vt is not _UNSET and not _converter_or_error(fn, vt, strict):
                vt = _UNSET

        def keys_for(ids: Iterable[Any]) -> dict[str, Any]:
            if isinstance(ids, (str, bytes)):
                raise ConfigurationError("pass an iterable of ids, not one string")
            return {key.format(i): i for i in ids}

        def rekey(keymap: dict[str, Any], found: Any) -> dict[str, Any]:
            return {key.format(i): v for i, v in found.items()}

        if inspect.iscoroutinefunction(fn):

            async def awrapper(ids: Iterable[Any]) -> dict[Any, Any]:
                keymap = keys_for(ids)

                async def load_many(missing: list[str]) -> dict[str, Any]:
                    return rekey(keymap, await fn([keymap[k] for k in missing]))

                values = await cache.get_many_cached(keymap, load_many, value_type=vt, **policy_options)
                return {keymap[k]: v for k, v in values.items()}

            wrapper: Any = awrapper
        else:

            def swrapper(ids: Iterable[Any]) -> dict[Any, Any]:
                keymap = keys_for(ids)

                def load_many(missing: list[str]) -> dict[str, Any]:
                    return rekey(keymap, fn([keymap[k] for k in missing]))

                values = cache.sync.get_many_cached(keymap, load_many, value_type=vt, **policy_options)
                return {keymap[k]: v for k, v in values.items()}

            wrapper = swrapper
        functools.update_wrapper(wrapper, fn)
        wrapper.uncached = fn
        return wrapper

    return _ManyDecorator(decorate)


K = TypeVar("K")
V = TypeVar("V")


class CachedManyFunction(Protocol[K, V]):
    """What ``@tiered_cache_many`` makes of a plain ``fn(ids) -> {id: value}`` (for type checkers)."""

    uncached: Callable[[list[K]], Mapping[K, V]]

    def __call__(self, ids: Iterable[K], /) -> dict[K, V]: ...


class AsyncCachedManyFunction(Protocol[K, V]):
    """What ``@tiered_cache_many`` makes of an ``async def fn(ids) -> {id: value}``."""

    uncached: Callable[[list[K]], Awaitable[Mapping[K, V]]]

    def __call__(self, ids: Iterable[K], /) -> Coroutine[Any, Any, dict[K, V]]: ...


class _ManyDecorator:
    """The decorator returned by ``tiered_cache_many(...)``: keeps the id and value types."""

    def __init__(self, decorate: Callable[[Callable[[list[Any]], Any]], Any]) -> None:
        self._decorate = decorate

    @overload
    def __call__(
        self, fn: Callable[[list[K]], Coroutine[Any, Any, Mapping[K, V]]]
    ) -> AsyncCachedManyFunction[K, V]: ...

    @overload
    def __call__(self, fn: Callable[[list[K]], Mapping[K, V]]) -> CachedManyFunction[K, V]: ...

    def __call__(self, fn: Callable[[list[Any]], Any]) -> Any:
        return self._decorate(fn)
