"""HTTP response caching for Starlette and FastAPI: Cache-Control, ETag/304 and Vary over a TieredCache.

How it hooks in
---------------
``http_cache.install(app)`` adds a small ASGI middleware that records, per request, what the
decorated endpoints need (a context variable: the request's scope and the app below the
middleware). ``@http_cache.cached(...)`` wraps an endpoint with ``functools.wraps`` (FastAPI's
dependency injection reads the original parameters through ``__wrapped__``; a coroutine function
stays one, a plain function stays plain). When it is called for a GET/HEAD request, it answers
from the cache; on a miss it *loads* by running the request again below the middleware -- routing,
the framework's endpoint machinery and the handler -- and storing exactly the status, headers and
body the framework produced (FastAPI's ``response_model`` and custom response classes included).
That run is self-contained, so it can also happen in the background (stale-while-revalidate).
``@http_cache.evict(...)`` / ``@http_cache.put(...)`` register work the middleware runs when the
write endpoint's response is a 2xx, before its last byte is sent.

Shared-cache semantics
----------------------
The TieredCache is shared by every user of the app (and, through Redis, every process), so it
behaves as a shared cache in RFC 9111's sense: responses marked ``private`` or ``no-store`` (by the
rule or by the handler), responses carrying ``Set-Cookie`` or ``Vary: *``, and responses to
requests with ``Authorization`` (unless the rule says ``public=True`` or sets ``s_maxage``) are
never stored. ``s-maxage`` is the server-side lifetime when present, else ``max-age``.
``stale-while-revalidate`` maps onto the cache's stale-while-revalidate (served at once, one
background refresh) and ``stale-if-error`` onto its fail-safe (an exception or a 5xx answer from
the handler is replaced by the stale response), each only within its own window.

Invariants kept here
--------------------
* A request never receives another request's uncacheable response: a waiter that joined a load
  whose result turned out uncacheable runs the handler itself.
* Every stored response carries its own lifetimes and storage time, so ``Age`` and the windows are
  computed from the response, never from which tier happened to hold it.
* Invalidation by ``evict``/``put`` happens before the last byte of the write's response is sent:
  a client that saw its write succeed never reads the old representation afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import logging
import string
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, MutableMapping
from contextvars import ContextVar
from email.utils import formatdate, parsedate_to_datetime
from typing import Any, TypeVar

try:
    from starlette.responses import Response
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tiercache.contrib.starlette needs Starlette (or FastAPI): pip install starlette"
    ) from exc

from .._cache import TieredCache
from .._engine import Source
from .._errors import ConfigurationError

__all__ = [
    "CacheRule",
    "HttpCache",
    "StoredResponse",
    "if_none_match_matches",
    "parse_cache_control",
    "strong_etag",
]

log = logging.getLogger("tiercache.contrib.starlette")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
F = TypeVar("F", bound=Callable[..., Any])

# RFC 9110 section 15.1: statuses a cache may store without explicit freshness information
# (206 left out: range responses are not reassembled here).
DEFAULT_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414})
# Hop-by-hop and per-connection headers are never stored (RFC 9111 section 3.1).
_NOT_STORED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"date",
        b"age",
        b"content-length",
    }
)
# What a 304 repeats of the 200 it stands for (RFC 9110 section 15.4.5), plus Last-Modified.
_KEPT_ON_304 = frozenset(
    {b"cache-control", b"content-location", b"etag", b"expires", b"vary", b"last-modified"}
)
# A GET run for ``put`` buffers at most this much before its endpoint's own max_body applies.
_MAX_PUT_BODY = 64 * 1024 * 1024
# What a GET run for ``put`` must not inherit from the write request.
_BODY_HEADERS = frozenset({b"content-length", b"content-type", b"transfer-encoding", b"content-encoding"})
# Conditional and range headers are answered here, so the handler always produces a full 200.
_STRIPPED_FROM_ORIGIN = frozenset(
    {b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range", b"range"}
)


# --- header parsing ------------------------------------------------------------------------------


def parse_cache_control(value: str) -> dict[str, str | None]:
    """``Cache-Control`` directives, lower-cased: ``{"max-age": "60", "no-store": None}``.

    Quoted arguments are unquoted; a directive repeated keeps its first value (RFC 9111 4.2.1
    says such a response is stale; here the first, usually the stricter one, is kept).
    """
    out: dict[str, str | None] = {}
    for part in _split_commas(value):
        name, eq, arg = part.partition("=")
        name = name.strip().lower()
        if not name or name in out:
            continue
        arg = arg.strip()
        if eq and len(arg) >= 2 and arg[0] == arg[-1] == '"':
            arg = arg[1:-1]
        out[name] = arg if eq else None
    return out


def _split_commas(value: str) -> list[str]:
    """Split a header list on commas outside quoted strings."""
    parts: list[str] = []
    buf: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(buf).strip())
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf).strip())
    return [p for p in parts if p]


def _seconds(directives: dict[str, str | None], name: str) -> int | None:
    """A delta-seconds directive's value; None when absent or malformed (then ignored)."""
    arg = directives.get(name)
    if arg is None or not arg.isdigit():
        return None
    return int(arg)


def _opaque(tag: str) -> str:
    """An entity-tag's opaque part: weak comparison ignores the ``W/`` prefix (RFC 9110 8.8.3.2)."""
    tag = tag.strip()
    return tag[2:] if tag.startswith(("W/", "w/")) else tag


def if_none_match_matches(header: str, etag: str) -> bool:
    """Does an ``If-None-Match`` value match ``etag``? ``*`` matches any current representation;
    otherwise the weak comparison function applies (RFC 9110 section 13.1.2)."""
    if header.strip() == "*":
        return True
    mine = _opaque(etag)
    return any(_opaque(candidate) == mine for candidate in _split_commas(header))


def strong_etag(body: bytes) -> str:
    """A strong entity-tag derived from the body alone (same bytes -> same tag, in any process)."""
    digest = hashlib.blake2b(body, digest_size=16).digest()
    return '"' + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii") + '"'


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()


# --- rules and the stored form -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CacheRule:
    """How one endpoint is cached (built by ``HttpCache.cached``; see its docstring)."""

    max_age: int
    s_maxage: int | None = None
    stale_while_revalidate: int = 0
    stale_if_error: int = 0
    private: bool = False
    public: bool = False
    vary: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    statuses: frozenset[int] = DEFAULT_STATUSES
    max_body: int = 8 * 1024 * 1024
    request_directives: bool = True

    def cache_control(self) -> str:
        """The ``Cache-Control`` value sent when the handler set none."""
        parts = ["private" if self.private else "public" if self.public else ""]
        parts.append(f"max-age={self.max_age}")
        if self.s_maxage is not None and not self.private:
            parts.append(f"s-maxage={self.s_maxage}")
        if self.stale_while_revalidate:
            parts.append(f"stale-while-revalidate={self.stale_while_revalidate}")
        if self.stale_if_error:
            parts.append(f"stale-if-error={self.stale_if_error}")
        return ", ".join(p for p in parts if p)


@dataclasses.dataclass
class StoredResponse:
    """A response as the cache keeps it (JSON-friendly: the body travels as base64 in Redis).

    ``stored_at`` is when the handler produced it (cache clock); ``ttl`` the shared-cache freshness
    lifetime; ``swr`` / ``sie`` the stale-while-revalidate / stale-if-error windows after it;
    ``vary`` the lower-cased request header names the response varies on.
    """

    status: int
    headers: list[list[str]]
    body: bytes
    etag: str
    stored_at: float
    ttl: float
    swr: float = 0.0
    sie: float = 0.0
    vary: list[str] = dataclasses.field(default_factory=list)

    # not a field (never stored): whether a shared cache may keep this response
    storable = True

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)


def _pass_marker(response: StoredResponse, ttl: float) -> StoredResponse:
    """What is stored when the handler's answer may not be shared ("hit-for-pass", status 0):
    later requests see it and run the handler alone, instead of queueing on one shared load
    whose answer they could not use. A storable answer replaces it."""
    return StoredResponse(status=0, headers=[], body=b"", etag="", stored_at=response.stored_at, ttl=ttl)


class _OriginError(Exception):
    """The handler answered 5xx: an error for stale-if-error, sent as is when nothing stale exists."""

    def __init__(self, response: StoredResponse) -> None:
        super().__init__(f"handler answered {response.status}")
        self.response = response


# --- the public object ---------------------------------------------------------------------------


class HttpCache:
    """HTTP caching for Starlette/FastAPI endpoints, stored in ``cache`` (a TieredCache).

    ``prefix`` starts every key and tag this object writes (default ``"http"``), so several
    HttpCache objects can share one TieredCache. Call :meth:`install` once on the app.
    """

    def __init__(self, cache: TieredCache, *, prefix: str = "http") -> None:
        if not isinstance(cache, TieredCache):
            raise ConfigurationError(f"HttpCache needs a TieredCache, not {type(cache).__qualname__}")
        if not prefix or ":" in prefix:
            raise ConfigurationError("prefix must be a non-empty str without ':'")
        self.cache = cache
        self.prefix = prefix
        # the request the current task or thread is serving, set by this object's middleware
        self._slot: ContextVar[_Slot | None] = ContextVar(f"tiercache_http_{prefix}", default=None)

    # --- decorators --------------------------------------------------------------------------

    def cached(
        self,
        max_age: int = 0,
        *,
        s_maxage: int | None = None,
        stale_while_revalidate: int = 0,
        stale_if_error: int = 0,
        private: bool = False,
        public: bool = False,
        vary: Iterable[str] = (),
        tags: Iterable[str] = (),
        statuses: Iterable[int] = DEFAULT_STATUSES,
        max_body: int = 8 * 1024 * 1024,
        request_directives: bool = True,
    ) -> Callable[[F], F]:
        """Cache a GET endpoint's responses.

        Clients get ``Cache-Control: max-age=<max_age>`` plus the other directives given, unless
        the handler sets its own ``Cache-Control`` (then that one is sent and obeyed). The server
        keeps a response for ``s_maxage`` seconds if given, else ``max_age`` (0: not stored, but
        ETag/304 still apply). ``stale_while_revalidate`` / ``stale_if_error``: RFC 5861 windows
        (seconds past freshness). ``private``: sent as ``private`` and never stored server-side.
        ``public``: also store responses to requests carrying ``Authorization``. ``vary``: request
        headers the response depends on (part of the key, and sent as ``Vary``). ``tags``: cache
        tags, formatted with the path parameters (``"item:{item_id}"``). ``statuses``: which
        statuses are stored. Bodies larger than ``max_body`` bytes are served but not stored.
        ``request_directives=False`` ignores the request's ``Cache-Control`` and ``Pragma`` (as
        many CDNs do), so a client cannot make the handler run by sending ``no-cache``.
        """
        for name, v in (
            ("max_age", max_age),
            ("stale_while_revalidate", stale_while_revalidate),
            ("stale_if_error", stale_if_error),
        ):
            _check_seconds(name, v)
        if s_maxage is not None:
            _check_seconds("s_maxage", s_maxage)
        if private and public:
            raise ConfigurationError("a response cannot be both private and public")
        if type(max_body) is not int or max_body < 0:
            raise ConfigurationError(f"max_body must be a whole number of bytes >= 0, not {max_body!r}")
        status_set = frozenset(statuses)
        if any(type(code) is not int or not 100 <= code <= 599 for code in status_set):
            bad = sorted(status_set, key=str)
            raise ConfigurationError(f"statuses must be HTTP status codes (int, 100-599), not {bad!r}")
        rule = CacheRule(
            max_age=max_age,
            s_maxage=s_maxage,
            stale_while_revalidate=stale_while_revalidate,
            stale_if_error=stale_if_error,
            private=private,
            public=public,
            vary=tuple(_check_header_names(vary)),
            tags=tuple(_check_templates("tags", tags)),
            statuses=status_set,
            max_body=max_body,
            request_directives=bool(request_directives),
        )

        def decorate(func: F) -> F:
            handler = _CachedEndpoint(self, rule)

            def on_call(slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Job | None:
                if slot.origin:
                    slot.found = handler  # a refresh for ``put`` wants to know who answered
                    return None
                if slot.claimed or slot.scope.get("method") not in ("GET", "HEAD"):
                    return None
                slot.claimed = True  # a decorated function called by another runs plainly
                return lambda: handler.respond(slot, _params(slot, args, kwargs))

            return self._decorate(func, on_call)

        return decorate

    def evict(self, *, paths: Iterable[str] = (), tags: Iterable[str] = ()) -> Callable[[F], F]:
        """After a successful (2xx) answer of this write endpoint, drop the cached responses of
        ``paths`` (every query string and Vary variant of each) and of ``tags``. Both are
        templates formatted with this request's path parameters: ``paths=("/items/{item_id}",)``.
        The eviction completes before the last byte of the response is sent."""
        path_list = _check_templates("paths", paths)
        tag_list = _check_templates("tags", tags)
        if not path_list and not tag_list:
            raise ConfigurationError("evict needs paths or tags")

        def decorate(func: F) -> F:
            def on_call(slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Job | None:
                if not slot.origin:
                    params = _params(slot, args, kwargs)
                    filled_paths = [_fill(p, params) for p in path_list]
                    filled_tags = [_fill(t, params) for t in tag_list]

                    async def evict_now() -> None:
                        await self.evict_paths(*filled_paths)
                        await self.evict_tags(*filled_tags)

                    slot.after_success.append(evict_now)
                return None

            return self._decorate(func, on_call)

        return decorate

    def put(self, path: str, *, evict_tags: Iterable[str] = ()) -> Callable[[F], F]:
        """After a successful (2xx) answer of this write endpoint, drop every cached variant of
        ``path`` (a template formatted with this request's path parameters) and ``evict_tags``,
        then run the GET endpoint of ``path`` once (with this request's headers) and store its
        answer under its own rule: the next reader is served the new representation from the
        cache. All of it completes before the last byte of the write's response is sent."""
        (template,) = _check_templates("path", (path,))
        tag_list = _check_templates("evict_tags", evict_tags)

        def decorate(func: F) -> F:
            def on_call(slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Job | None:
                if not slot.origin:
                    params = _params(slot, args, kwargs)
                    target = _fill(template, params)
                    filled_tags = [_fill(t, params) for t in tag_list]

                    async def put_now() -> None:
                        await self.evict_paths(target)
                        await self.evict_tags(*filled_tags)
                        await self._refresh(slot, target)

                    slot.after_success.append(put_now)
                return None

            return self._decorate(func, on_call)

        return decorate

    def _decorate(
        self, func: F, on_call: Callable[[_Slot, tuple[Any, ...], dict[str, Any]], Job | None]
    ) -> F:
        """Wrap ``func`` keeping its signature (``functools.wraps``: FastAPI reads the parameters
        through ``__wrapped__``) and its kind: a coroutine function stays one, a plain function
        stays plain (the framework runs it in a worker thread; the cache work then runs on the
        event loop through ``anyio.from_thread``)."""
        slot_var = self._slot
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def endpoint(*args: Any, **kwargs: Any) -> Any:
                slot = slot_var.get()
                job = None if slot is None else on_call(slot, args, kwargs)
                if job is None:
                    return await func(*args, **kwargs)
                return await job()

            return _keep_signature(endpoint, func)

        @functools.wraps(func)
        def sync_endpoint(*args: Any, **kwargs: Any) -> Any:
            slot = slot_var.get()
            job = None if slot is None else on_call(slot, args, kwargs)
            if job is None:
                return func(*args, **kwargs)
            from anyio.from_thread import run

            try:
                return run(job)
            except RuntimeError as exc:
                if "thread" not in str(exc):
                    raise
                log.warning("%s ran outside the server's worker threads: not cached", func)
                return func(*args, **kwargs)

        return _keep_signature(sync_endpoint, func)

    # --- installation ------------------------------------------------------------------------

    def install(self, app: Any) -> None:
        """Hook this HttpCache into a Starlette or FastAPI ``app``, before it starts serving.

        Call it right after creating the app, before adding other middleware: it is then the
        innermost middleware, and what runs again when a response is (re)loaded is routing,
        the framework's endpoint machinery and the handler -- not your other middleware.
        """
        if not hasattr(app, "add_middleware"):
            raise ConfigurationError("install() takes a Starlette or FastAPI application")
        app.add_middleware(_Middleware, http_cache=self)

    # --- keys, tags and invalidation -----------------------------------------------------------

    def _base_key(self, scope: Scope) -> str:
        path = scope["path"]  # ASGI: the full path, root_path included
        query = scope.get("query_string", b"").decode("latin-1")
        return f"{self.prefix}:{_digest(path + '?' + query)}"

    def path_tag(self, path: str) -> str:
        """The tag every stored variant of ``path`` (any query string) carries."""
        return f"{self.prefix}-path:{_digest(path)}"

    def user_tag(self, tag: str) -> str:
        """The cache tag a rule's ``tags`` entry becomes."""
        return f"{self.prefix}-tag:{tag}"

    async def evict_paths(self, *paths: str) -> None:
        """Drop the cached responses of these request paths (all query strings and variants)."""
        if paths:
            await self.cache.invalidate_tags(*(self.path_tag(p) for p in paths))

    async def evict_tags(self, *tags: str) -> None:
        """Drop the cached responses carrying any of these rule tags."""
        if tags:
            await self.cache.invalidate_tags(*(self.user_tag(t) for t in tags))

    async def _refresh(self, slot: _Slot, path: str) -> None:
        """Run the GET endpoint of ``path`` and store its answer under that endpoint's rule."""
        scope = _origin_scope(slot.raw)
        scope.update(path=path, raw_path=path.encode("utf-8"), query_string=b"", path_params={})
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() not in _BODY_HEADERS]
        status, raw, body, too_big, found = await _run_origin(self, slot.app, scope, _MAX_PUT_BODY)
        if not isinstance(found, _CachedEndpoint):
            log.warning("put(%r): no cached GET endpoint answers that path", path)
            return
        response = found._build(status, raw, body, too_big or len(body) > found.rule.max_body)
        if not response.storable:
            return
        base = self._base_key(scope)
        learnt = await _safe(self.cache.get(base + ":vary"))
        names = set(response.vary) | (set(learnt) if isinstance(learnt, list) else set())
        key = _variant_key(base, scope, sorted(names))
        params = {k: str(v) for k, v in (scope.get("path_params") or {}).items()}
        # written after the path's invalidation, so (clock permitting) it is newer than it; if
        # the clock has not moved, the entry is simply invalid: a miss, never stale data
        await self.cache.set(key, response, **found._lifetimes(response, path, params))


def _keep_signature(wrapper: Callable[..., Any], func: F) -> F:
    """Give ``wrapper`` the signature of ``func`` with string annotations already evaluated:
    FastAPI versions that resolve annotations in the endpoint's own ``__globals__`` (before
    0.115 or so) would otherwise look them up in this module (``from __future__ import
    annotations`` makes every annotation a string). A forward reference that cannot be
    evaluated yet is left to FastAPI, as for an undecorated endpoint."""
    with contextlib.suppress(NameError, TypeError, SyntaxError, AttributeError):
        wrapper.__signature__ = inspect.signature(func, eval_str=True)  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


Job = Callable[[], Coroutine[Any, Any, Any]]
OnCall = Callable[["_Slot", tuple[Any, ...], dict[str, Any]], "Job | None"]


def _params(slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, str]:
    """The path parameters of this request, for templates (the routed scope's, else the
    endpoint's keyword arguments, which is how FastAPI passes them)."""
    out = {k: str(v) for k, v in kwargs.items() if isinstance(v, (str, int, float, uuid.UUID))}
    for arg in args:  # a Starlette endpoint's request
        params = getattr(arg, "path_params", None)
        if isinstance(params, dict):
            out.update({k: str(v) for k, v in params.items()})
    out.update({k: str(v) for k, v in (slot.scope.get("path_params") or {}).items()})
    return out


def _check_seconds(name: str, value: object) -> None:
    if type(value) is not int or value < 0:
        raise ConfigurationError(f"{name} must be a whole number of seconds >= 0, not {value!r}")


def _check_header_names(names: Iterable[str]) -> list[str]:
    if isinstance(names, str):
        raise ConfigurationError("vary takes an iterable of header names, not one string")
    out = []
    for name in names:
        if not isinstance(name, str) or not name or any(c in name for c in " \t,:*"):
            raise ConfigurationError(f"not a header name for vary: {name!r}")
        out.append(name.lower())
    return sorted(set(out))


def _check_templates(what: str, values: Iterable[str]) -> list[str]:
    if isinstance(values, str):
        raise ConfigurationError(f"{what} takes an iterable of strings, not one string")
    out = []
    for value in values:
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{what} must be non-empty strings, not {value!r}")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ConfigurationError(f"bad template in {what}: {value!r} ({exc})") from None
        if any(not f.isidentifier() for f in fields):
            raise ConfigurationError(f"{what} templates may only name path parameters: {value!r}")
        out.append(value)
    return out


def _fill(template: str, params: dict[str, str]) -> str:
    try:
        return template.format_map(params)
    except KeyError as exc:
        raise ConfigurationError(f"{template!r} names {exc}, which is not a path parameter") from None


def _header(scope: Scope, name: bytes) -> str | None:
    values = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == name]
    return ", ".join(values) if values else None


# --- the middleware: one slot per request, and the after-success hook for write endpoints -----------


class _Slot:
    """What a decorated endpoint needs to know about the request it is serving."""

    __slots__ = ("after_success", "app", "claimed", "found", "origin", "raw", "scope")

    def __init__(self, app: ASGIApp, scope: Scope, *, origin: bool = False) -> None:
        self.app = app  # everything below the middleware: what a (re)load runs
        self.scope = scope  # the live scope (routing adds path_params to it)
        self.raw = dict(scope)  # as it arrived, for running the request again
        self.origin = origin  # a run made by the cache itself: endpoints just run
        self.claimed = False
        self.found: _CachedEndpoint | None = None
        self.after_success: list[Job] = []


class _Middleware:
    """Sets the request's slot for the decorated endpoints and runs their after-success jobs."""

    def __init__(self, app: ASGIApp, *, http_cache: HttpCache) -> None:
        self.app = app
        self.http_cache = http_cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot = _Slot(self.app, scope)
        relay = _Relay(slot, send)
        token = self.http_cache._slot.set(slot)
        try:
            await self.app(scope, receive, relay)
        finally:
            self.http_cache._slot.reset(token)
            # a 2xx write whose response never finished (client gone, error mid-body) still
            # changed data: forget the old copies anyway
            await relay.finish()


class _Relay:
    """The response's ``send``: before the last body message of a 2xx answer, run the slot's
    after-success jobs (evictions), so the client never sees its write complete before the
    cache forgot the old data."""

    __slots__ = ("done", "send", "slot", "status")

    def __init__(self, slot: _Slot, send: Send) -> None:
        self.slot = slot
        self.send = send
        self.status = 0
        self.done = False

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
        elif kind == "http.response.body" and not message.get("more_body", False):
            await self.finish()
        await self.send(message)

    async def finish(self) -> None:
        """Run the after-success jobs once, if the answer was a 2xx."""
        if self.done:
            return
        self.done = True
        if self.slot.after_success and 200 <= self.status < 300:
            try:
                for job in self.slot.after_success:
                    await job()
            except Exception:
                log.warning("HTTP cache invalidation after a write failed", exc_info=True)


# --- running the handler ("the origin") and capturing its response -------------------------------


async def _run_origin(
    http_cache: HttpCache, app: ASGIApp, scope: Scope, max_body: int
) -> tuple[int, list[Any], bytes, bool, _CachedEndpoint | None]:
    """Run the app below the middleware for ``scope``; collect (status, raw headers, body,
    too_big, the cached endpoint that answered). The run reads no request body (it is a GET,
    possibly in the background after the request is gone)."""
    started: dict[str, Any] = {}
    chunks: list[bytes] = []
    size = 0
    too_big = False
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # no disconnect ever arrives; listeners get cancelled
        raise AssertionError("unreachable")

    async def capture(message: Message) -> None:
        nonlocal size, too_big
        if message["type"] == "http.response.start":
            started["status"] = message["status"]
            started["headers"] = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            size += len(body)
            too_big = too_big or size > max_body  # still served whole, only never stored
            chunks.append(body)

    slot = _Slot(app, scope, origin=True)
    token = http_cache._slot.set(slot)
    try:
        await app(scope, receive, capture)
    finally:
        http_cache._slot.reset(token)
    if "status" not in started:
        raise RuntimeError("the endpoint finished without sending a response")
    return started["status"], started["headers"], b"".join(chunks), too_big, slot.found


def _origin_scope(scope: Scope) -> Scope:
    """A copy of the request's scope for running it again: a GET without validators."""
    sub = dict(scope)
    sub["method"] = "GET"
    sub["headers"] = [(k, v) for k, v in scope.get("headers", ()) if k.lower() not in _STRIPPED_FROM_ORIGIN]
    sub["state"] = dict(scope.get("state") or {})
    return sub


class _CachedEndpoint:
    """What a ``cached`` endpoint does with a GET/HEAD request: answer it from the cache, or
    (re)load it by running the request again below the middleware, conditionally (304)."""

    def __init__(self, http_cache: HttpCache, rule: CacheRule) -> None:
        self.http_cache = http_cache
        self.cache = http_cache.cache
        self.rule = rule
        rule_ttl = rule.s_maxage if rule.s_maxage is not None else rule.max_age
        self.default_ttl = 0 if rule.private else rule_ttl

    async def respond(self, slot: _Slot, params: dict[str, str]) -> Any:
        """The response object the endpoint returns (the framework sends it unchanged)."""
        try:
            response, hit = await self._serve(slot, params)
        except _OriginError as exc:
            response, hit = exc.response, False
        return self._response(slot.scope, response, hit=hit)

    async def _serve(self, slot: _Slot, params: dict[str, str]) -> tuple[StoredResponse, bool]:
        rule = self.rule
        scope = slot.scope
        req_cc: dict[str, str | None] = {}
        if rule.request_directives:
            req_cc = parse_cache_control(_header(scope, b"cache-control") or "")
            if not req_cc and "no-cache" in (_header(scope, b"pragma") or "").lower():
                req_cc = {"no-cache": None}  # HTTP/1.0 clients (RFC 9111 5.4)
        authorized = _header(scope, b"authorization") is not None
        # RFC 9111 3.5: a shared cache stores answers to authorized requests only when the response
        # says public or s-maxage (here: the rule does)
        if self.default_ttl <= 0 or (authorized and not rule.public and rule.s_maxage is None):
            return await self._origin(slot), False
        may_store = "no-store" not in req_cc

        cache = self.cache
        base = self.http_cache._base_key(scope)
        names = set(rule.vary)
        learnt = await _safe(cache.get(base + ":vary"))
        if isinstance(learnt, list):
            names.update(n for n in learnt if isinstance(n, str))
        key = _variant_key(base, scope, sorted(names))
        revalidate = "no-cache" in req_cc or _seconds(req_cc, "max-age") == 0

        if not may_store:  # request no-store: a fresh stored response may be used, nothing is stored
            stored = None if revalidate else await _safe(cache.get(key, value_type=StoredResponse))
            if isinstance(stored, StoredResponse) and self._acceptable(stored, req_cc, names):
                return stored, True
            else:
                return await self._origin(slot), False

        if revalidate:
            response = await self._reload(slot, params, key, sorted(names))
            return response, False

        if "only-if-cached" in req_cc:
            stored = await _safe(cache.get(key, value_type=StoredResponse))
            if isinstance(stored, StoredResponse) and self._acceptable(stored, req_cc, names):
                return stored, True
            else:
                return _gateway_timeout(cache.clock()), False

        # the common case first: a fresh stored copy (an L1 read: a few microseconds, where the
        # full lookup builds a per-call policy); anything else goes through get_cached, with the
        # stale windows of the stored response itself (a handler's own Cache-Control may differ
        # from the rule's), else of the rule
        stored = await _safe(cache.get(key, value_type=StoredResponse, allow_stale=True))
        current = stored if isinstance(stored, StoredResponse) and stored.status != 0 else None
        if (
            current is not None
            and current.age(cache.clock()) < current.ttl
            and self._acceptable(current, req_cc, names)
        ):
            return current, True
        response, hit = await self._lookup(slot, params, key, sorted(names), current)
        if hit and not self._acceptable(response, req_cc, names):  # the request's max-age is stricter
            response, hit = await self._reload(slot, params, key, sorted(names)), False
        if not hit and learnt is None and set(response.vary) <= names:
            # remember the URL's Vary names (none, usually) so that the index read every request
            # makes is an L1 hit, not a shared-tier miss; without it lookups are still correct
            index_ttl = max(self.default_ttl, response.ttl + max(response.swr, response.sie), 1.0)
            await _safe(cache.set(base + ":vary", sorted(names), ttl=index_ttl))
        return response, hit

    def _acceptable(self, stored: StoredResponse, req_cc: dict[str, str | None], names: set[str]) -> bool:
        """May this stored response answer the request read-only (no load)?"""
        if stored.status == 0 or not set(stored.vary) <= names:  # a pass marker / another variant
            return False
        limit = _seconds(req_cc, "max-age")
        return limit is None or stored.age(self.cache.clock()) <= limit

    async def _lookup(
        self,
        slot: _Slot,
        params: dict[str, str],
        key: str,
        names: list[str],
        current: StoredResponse | None,
    ) -> tuple[StoredResponse, bool]:
        """get_cached with the rule's windows; a stale answer outside its own window is refused."""
        rule = self.rule
        mine: list[Any] = []  # what this request's own load produced (response or exception)

        async def load() -> StoredResponse:
            try:
                response = await self._fetch(slot)
            except BaseException as exc:
                mine.append(exc)
                raise
            mine.append(response)
            return response if response.storable else _pass_marker(response, self.default_ttl)

        options: dict[str, Any] = {
            "ttl": self.default_ttl,
            "stale_ttl": max(rule.stale_while_revalidate, rule.stale_if_error),
            "tags": self._tags(slot.scope["path"], params),
            "swr": (current.swr if current is not None else rule.stale_while_revalidate) > 0,
            "fail_safe": (current.sie if current is not None else rule.stale_if_error) > 0,
            "value_type": StoredResponse,
        }
        for attempt in range(2):
            found = await self.cache.lookup(key, load, **options)
            response = found.value
            if not isinstance(response, StoredResponse):  # not ours (someone else's key?)
                return await self._pass(slot, params, key), False
            if response.status == 0:  # hit-for-pass: the handler's answers are not shareable
                if found.source == Source.LOADED and mine and isinstance(mine[0], StoredResponse):
                    return mine[0], False
                # a marker, or a joined load whose answer may not be shared: ask the handler
                return await self._pass(slot, params, key), False
            if not set(response.vary) <= set(names):
                # the response varies on request headers the key did not include (a Vary the
                # handler set, not learnt yet): it may be another variant's, so it is never used
                # for this request, even by the load that produced it (whose key was wrong too)
                own = found.source == Source.LOADED and mine and mine[0] is response
                if not own:
                    response = await self._origin(slot)
                if response.storable:
                    await self._after_load(key, response, names, slot.scope, params)
                return response, False
            age = response.age(self.cache.clock())
            if found.source == Source.STALE_SWR and age > response.ttl + response.swr and attempt == 0:
                options["swr"] = False  # past the SWR window: wait for the refresh just started
                continue
            failed = mine[0] if mine and isinstance(mine[0], BaseException) else None
            past_window = age > response.ttl + response.sie
            if found.source == Source.STALE_FAILSAFE and failed is not None and past_window:
                raise failed  # past the stale-if-error window: the error stands
            if found.source == Source.LOADED:
                await self._after_load(key, response, names, slot.scope, params)
            return response, found.source != Source.LOADED
        raise AssertionError("unreachable")

    async def _pass(self, slot: _Slot, params: dict[str, str], key: str) -> StoredResponse:
        """Run the handler for this request alone; a storable answer replaces the pass marker."""
        response = await self._origin(slot)
        if response.storable:
            await _safe(
                self.cache.set(key, response, **self._lifetimes(response, slot.scope["path"], params))
            )
        return response

    async def _reload(
        self, slot: _Slot, params: dict[str, str], key: str, names: list[str]
    ) -> StoredResponse:
        """Revalidate with the handler now (request no-cache / max-age=0) and store the result."""
        try:
            response = await self._fetch(slot)
        except _OriginError as exc:
            return exc.response
        if response.storable:
            lifetimes = self._lifetimes(response, slot.scope["path"], params)
            await _safe(self.cache.set(key, response, **lifetimes))
            await self._after_load(key, response, names, slot.scope, params, stored=True)
        else:  # what is stored is obsolete: the handler's current answer may not be shared
            marker = _pass_marker(response, self.default_ttl)
            await _safe(self.cache.set(key, marker, ttl=self.default_ttl, value_type=StoredResponse))
        return response

    def _tags(self, path: str, params: dict[str, str]) -> list[str]:
        tags = [self.http_cache.path_tag(path)]
        return tags + [self.http_cache.user_tag(_fill(t, params)) for t in self.rule.tags]

    def _lifetimes(self, response: StoredResponse, path: str, params: dict[str, str]) -> dict[str, Any]:
        stale = max(response.swr, response.sie)
        return {
            "ttl": response.ttl,
            "stale_ttl": stale,
            "tags": self._tags(path, params),
            "value_type": StoredResponse,  # a dataclass: remote tiers need its declared type
        }

    async def _after_load(
        self,
        key: str,
        response: StoredResponse,
        names: list[str],
        scope: Scope,
        params: dict[str, str],
        *,
        stored: bool = False,
    ) -> None:
        """Fix what the loader could not know in advance: a Vary header naming request headers
        not in the key (store under the right key, remember the names for this URL) and
        lifetimes the handler set itself (re-store with them)."""
        base = key.rsplit(":", 1)[0]
        extra = set(response.vary) - set(names)
        if extra:
            all_names = sorted(set(names) | extra)
            await _safe(self.cache.set(base + ":vary", all_names, ttl=max(response.ttl, 1.0)))
            await _safe(self.cache.delete(key))
            right = _variant_key(base, scope, all_names)
            await _safe(self.cache.set(right, response, **self._lifetimes(response, scope["path"], params)))
            return
        if not stored and (
            response.ttl != self.default_ttl
            or max(response.swr, response.sie)
            != max(self.rule.stale_while_revalidate, self.rule.stale_if_error)
        ):
            await _safe(self.cache.set(key, response, **self._lifetimes(response, scope["path"], params)))

    async def _fetch(self, slot: _Slot) -> StoredResponse:
        """Run the handler; its response (``storable`` says if it may be shared), or _OriginError."""
        response = await self._origin(slot)
        status = response.status
        if status >= 500:
            raise _OriginError(response)
        return response

    async def _origin(self, slot: _Slot) -> StoredResponse:
        """Run the request again below the middleware (the handler answers; nothing is stored)."""
        scope = _origin_scope(slot.raw)
        run = await _run_origin(self.http_cache, slot.app, scope, self.rule.max_body)
        return self._build(run[0], run[1], run[2], run[3])

    def _build(self, status: int, raw: list[Any], body: bytes, too_big: bool) -> StoredResponse:
        """The response as it will be sent (rule headers added) and whether a shared cache may keep it."""
        rule = self.rule
        headers: list[list[str]] = []
        cc_value = etag = None
        vary: list[str] = []
        storable = not too_big and status in rule.statuses
        for k, v in raw:
            name = bytes(k).lower()
            if name in _NOT_STORED:
                continue
            value = bytes(v).decode("latin-1")
            if name == b"cache-control":
                cc_value = value if cc_value is None else cc_value + ", " + value
                continue
            if name == b"etag":
                etag = value
                continue
            if name == b"vary":
                vary.extend(p.lower() for p in _split_commas(value))
                continue
            if name == b"set-cookie":
                storable = False
            headers.append([name.decode("latin-1"), value])
        if cc_value is None and status < 500:
            cc_value = rule.cache_control()
        cc = parse_cache_control(cc_value or "")
        if "no-store" in cc or "private" in cc or "no-cache" in cc or "*" in vary:
            storable = False
        ttl = _seconds(cc, "s-maxage")
        if ttl is None:
            ttl = _seconds(cc, "max-age")
        if ttl is None or ttl <= 0:
            storable = False
        revalidate = "must-revalidate" in cc or "proxy-revalidate" in cc
        swr = 0 if revalidate else _seconds(cc, "stale-while-revalidate") or 0
        sie = 0 if revalidate else _seconds(cc, "stale-if-error") or 0
        all_vary = sorted(set(vary) | set(rule.vary))
        if cc_value:
            headers.append(["cache-control", cc_value])
        if all_vary:
            headers.append(["vary", ", ".join(all_vary)])
        if etag is None and 200 <= status < 300:
            etag = strong_etag(body)
        now = self.cache.clock()
        if 200 <= status < 300 and not any(name == "last-modified" for name, _ in headers):
            # when this representation was produced: all a cache in front of the handler knows
            headers.append(["last-modified", formatdate(now, usegmt=True)])
        response = StoredResponse(
            status=status,
            headers=headers,
            body=body,
            etag=etag or "",
            stored_at=now,
            ttl=float(ttl or 0),
            swr=float(swr),
            sie=float(sie),
            vary=all_vary,
        )
        response.storable = storable
        return response

    def _response(self, scope: Scope, response: StoredResponse, *, hit: bool) -> Any:
        """``response`` as a Starlette Response (a 304 when the request's If-None-Match matches)."""
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        if response.etag:
            headers.append((b"etag", response.etag.encode("latin-1")))
        if hit:
            age = int(response.age(self.cache.clock()))
            headers.append((b"age", str(age).encode()))
        inm = _header(scope, b"if-none-match")
        out = Response()
        if 200 <= response.status < 300 and (
            if_none_match_matches(inm, response.etag)
            if inm is not None  # If-None-Match, when present, decides alone (RFC 9110 13.2.2)
            else _not_modified_since(_header(scope, b"if-modified-since"), response)
        ):
            out.status_code = 304
            out.raw_headers = [(k, v) for k, v in headers if k in _KEPT_ON_304 or k == b"age"]
            return out
        headers.append((b"content-length", str(len(response.body)).encode()))
        out.status_code = response.status
        out.body = b"" if scope.get("method") == "HEAD" else response.body
        out.raw_headers = headers
        return out


def _not_modified_since(header: str | None, response: StoredResponse) -> bool:
    """``If-Modified-Since`` against the response's ``Last-Modified``; an invalid date on
    either side is ignored (RFC 9110 13.1.3), which means: send the full response."""
    if header is None:
        return False
    last = next((v for k, v in response.headers if k == "last-modified"), None)
    try:
        since = parsedate_to_datetime(header)
        modified = parsedate_to_datetime(last) if last is not None else None
    except (TypeError, ValueError):
        return False
    if modified is None or since.tzinfo is None or modified.tzinfo is None:
        return False
    return modified <= since


def _variant_key(base: str, scope: Scope, names: list[str]) -> str:
    if not names:
        return base + ":-"
    values = "\n".join(f"{n}={_normalise(_header(scope, n.encode('latin-1')))}" for n in names)
    return base + ":" + _digest(values)


def _normalise(value: str | None) -> str:
    if value is None:
        return "\x00"  # absent differs from empty
    return ", ".join(p.strip() for p in value.split(","))


def _gateway_timeout(now: float) -> StoredResponse:
    return StoredResponse(
        status=504,
        headers=[["content-type", "text/plain; charset=utf-8"]],
        body=b"not in cache (only-if-cached)",
        etag="",
        stored_at=now,
        ttl=0.0,
    )


async def _safe(awaitable: Awaitable[Any]) -> Any:
    """Await a cache operation whose failure must not fail the request (logged, None)."""
    try:
        return await awaitable
    except Exception:
        log.warning("HTTP cache operation failed; serving without it", exc_info=True)
        return None
