"""HTTP response caching for Starlette and FastAPI: Cache-Control, ETag/304 and Vary over a TieredCache.

How it hooks in
---------------
``@http_cache.cached(...)``, ``@http_cache.evict(...)`` and ``@http_cache.put(...)`` only *mark*
an endpoint (they return the very same function, so FastAPI's dependency injection and every
caller see its signature unchanged). ``http_cache.install(app)`` adds a small ASGI middleware that,
on the first request (and whenever the app's route list grows), finds the routes whose endpoint is
marked and wraps each route's own ASGI app. The caching layer therefore runs *after* routing and
*around* the framework's whole endpoint machinery: what it stores is exactly the status, headers and
body the framework produced (FastAPI's ``response_model`` filtering and custom response classes
included), and running "the origin" is calling that route app with a copy of the request's scope.

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
import dataclasses
import hashlib
import logging
import string
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any, TypeVar

from .._cache import TieredCache
from .._errors import ConfigurationError
from .._flow import Source

__all__ = ["CacheRule", "HttpCache", "StoredResponse"]

log = logging.getLogger("tiercache.contrib.starlette")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__tiercache_http__"
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
# What a 304 repeats of the 200 it stands for (RFC 9110 section 15.4.5).
_KEPT_ON_304 = frozenset({b"cache-control", b"content-location", b"etag", b"expires", b"vary"})
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
        # cached routes found so far, for ``put`` to find the GET rule of a path
        self._cached_routes: list[tuple[Any, CacheRule]] = []

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
        """
        for name, v in (("max_age", max_age), ("stale_while_revalidate", stale_while_revalidate)):
            _check_seconds(name, v)
        _check_seconds("stale_if_error", stale_if_error)
        if s_maxage is not None:
            _check_seconds("s_maxage", s_maxage)
        if private and public:
            raise ConfigurationError("a response cannot be both private and public")
        rule = CacheRule(
            max_age=max_age,
            s_maxage=s_maxage,
            stale_while_revalidate=stale_while_revalidate,
            stale_if_error=stale_if_error,
            private=private,
            public=public,
            vary=tuple(_check_header_names(vary)),
            tags=tuple(_check_templates("tags", tags)),
            statuses=frozenset(statuses),
            max_body=max_body,
        )
        return self._marker(("cached", rule))

    def evict(self, *, paths: Iterable[str] = (), tags: Iterable[str] = ()) -> Callable[[F], F]:
        """After a successful (2xx) answer of this write endpoint, drop the cached responses of
        ``paths`` (every query string and Vary variant of each) and of ``tags``. Both are
        templates formatted with this request's path parameters: ``paths=("/items/{item_id}",)``.
        The eviction completes before the last byte of the response is sent."""
        spec = ("evict", tuple(_check_templates("paths", paths)), tuple(_check_templates("tags", tags)))
        if not spec[1] and not spec[2]:
            raise ConfigurationError("evict needs paths or tags")
        return self._marker(spec)

    def put(self, path: str, *, evict_tags: Iterable[str] = ()) -> Callable[[F], F]:
        """After a successful (2xx) answer of this write endpoint, store its response as the GET
        representation of ``path`` (a template formatted with this request's path parameters),
        with the lifetimes of the cached GET route serving that path; its other variants and
        ``evict_tags`` are dropped first. A response that is not storable is only an eviction."""
        (checked,) = _check_templates("path", (path,))
        return self._marker(("put", checked, tuple(_check_templates("evict_tags", evict_tags))))

    def _marker(self, spec: tuple[Any, ...]) -> Callable[[F], F]:
        def mark(endpoint: F) -> F:
            target = getattr(endpoint, "__func__", endpoint)
            specs = getattr(target, _MARK, None)
            if specs is None:
                specs = {}
                setattr(target, _MARK, specs)
            if id(self) in specs:
                raise ConfigurationError(
                    f"{endpoint!r} already has a tiercache HTTP rule from this HttpCache"
                )
            specs[id(self)] = spec
            return endpoint

        return mark

    # --- installation ------------------------------------------------------------------------

    def install(self, app: Any) -> None:
        """Hook this HttpCache into a Starlette or FastAPI ``app`` (before it starts serving)."""
        router = getattr(app, "router", app)
        if not hasattr(router, "routes") or not hasattr(app, "add_middleware"):
            raise ConfigurationError("install() takes a Starlette or FastAPI application")
        app.add_middleware(_Installer, http_cache=self, router=router)

    def _wrap_routes(self, routes: Sequence[Any]) -> None:
        for route in routes:
            inner_routes = getattr(route, "routes", None)
            if inner_routes:
                self._wrap_routes(inner_routes)
            endpoint = getattr(route, "endpoint", None)
            specs = getattr(getattr(endpoint, "__func__", endpoint), _MARK, None)
            spec = specs.get(id(self)) if specs else None
            if spec is None or not hasattr(route, "app"):
                continue
            wrapped = getattr(route, "_tiercache_wrapped", None)
            if wrapped is not None and id(self) in wrapped:
                continue
            if spec[0] == "cached":
                route.app = _CachedRoute(self, route.app, spec[1])
                self._cached_routes.append((route, spec[1]))
            else:
                route.app = _WriteRoute(self, route.app, spec)
            route._tiercache_wrapped = (wrapped or frozenset()) | {id(self)}

    # --- keys ----------------------------------------------------------------------------------

    def _base_key(self, scope: Scope) -> str:
        path = scope.get("root_path", "") + scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        return f"{self.prefix}:{_digest(path + '?' + query)}"

    def path_tag(self, path: str) -> str:
        """The tag every stored variant of ``path`` (any query string) carries."""
        return f"{self.prefix}-path:{_digest(path)}"

    def user_tag(self, tag: str) -> str:
        return f"{self.prefix}-tag:{tag}"

    async def evict_paths(self, *paths: str) -> None:
        """Drop the cached responses of these paths (all query strings and variants)."""
        if paths:
            await self.cache.invalidate_tags(*(self.path_tag(p) for p in paths))

    async def evict_tags(self, *tags: str) -> None:
        """Drop the cached responses carrying any of these rule tags."""
        if tags:
            await self.cache.invalidate_tags(*(self.user_tag(t) for t in tags))


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


def _fill(template: str, scope: Scope) -> str:
    params = scope.get("path_params", {})
    try:
        return template.format_map({k: str(v) for k, v in params.items()})
    except KeyError as exc:
        raise ConfigurationError(f"{template!r} names {exc}, which is not a path parameter") from None


def _header(scope: Scope, name: bytes) -> str | None:
    values = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == name]
    return ", ".join(values) if values else None


# --- the middleware that finds marked routes ------------------------------------------------------


class _Installer:
    """Wraps the marked routes' apps on the first request and whenever the route list grows."""

    def __init__(self, app: ASGIApp, *, http_cache: HttpCache, router: Any) -> None:
        self.app = app
        self.http_cache = http_cache
        self.router = router
        self.seen = -1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(self.router.routes) != self.seen:
            self.seen = len(self.router.routes)
            self.http_cache._wrap_routes(self.router.routes)
        await self.app(scope, receive, send)


# --- running the handler ("the origin") and capturing its response -------------------------------


async def _run_origin(app: ASGIApp, scope: Scope, receive: Receive | None, max_body: int) -> tuple[Any, ...]:
    """Run the route app for ``scope`` and collect (status, raw headers, body, too_big)."""
    started: dict[str, Any] = {}
    chunks: list[bytes] = []
    size = 0
    too_big = False

    async def capture(message: Message) -> None:
        nonlocal size, too_big
        if message["type"] == "http.response.start":
            started["status"] = message["status"]
            started["headers"] = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            size += len(body)
            too_big = too_big or size > max_body
            chunks.append(body)

    if receive is None:  # a background refresh: the original request is gone; GETs have no body
        sent = False

        async def receive_none() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # no disconnect ever arrives; listeners get cancelled
            raise AssertionError("unreachable")

        receive = receive_none
    await app(scope, receive, capture)
    if "status" not in started:
        raise RuntimeError("the endpoint finished without sending a response")
    return started["status"], started["headers"], b"".join(chunks), too_big


def _origin_scope(scope: Scope) -> Scope:
    sub = dict(scope)
    sub["method"] = "GET"
    sub["headers"] = [(k, v) for k, v in scope.get("headers", ()) if k.lower() not in _STRIPPED_FROM_ORIGIN]
    return sub


class _CachedRoute:
    """The route app of a ``cached`` endpoint: answers GET/HEAD from the cache, conditionally."""

    def __init__(self, http_cache: HttpCache, app: ASGIApp, rule: CacheRule) -> None:
        self.http_cache = http_cache
        self.cache = http_cache.cache
        self.app = app
        self.rule = rule
        rule_ttl = rule.s_maxage if rule.s_maxage is not None else rule.max_age
        self.default_ttl = 0 if rule.private else rule_ttl

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        try:
            await self._serve(scope, receive, send)
        except _OriginError as exc:
            await self._send(scope, send, exc.response, hit=False)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        rule = self.rule
        req_cc = parse_cache_control(_header(scope, b"cache-control") or "")
        if not req_cc and "no-cache" in (_header(scope, b"pragma") or "").lower():
            req_cc = {"no-cache": None}  # HTTP/1.0 clients (RFC 9111 5.4)
        authorized = _header(scope, b"authorization") is not None
        # RFC 9111 3.5: a shared cache stores answers to authorized requests only when the response
        # says public or s-maxage (here: the rule does)
        if self.default_ttl <= 0 or (authorized and not rule.public and rule.s_maxage is None):
            await self._send(scope, send, await self._origin(scope, receive), hit=False)
            return
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
            if isinstance(stored, StoredResponse) and self._acceptable(stored, req_cc):
                await self._send(scope, send, stored, hit=True)
            else:
                await self._send(scope, send, await self._origin(scope, receive), hit=False)
            return

        if revalidate:
            response = await self._reload(scope, receive, key, sorted(names))
            await self._send(scope, send, response, hit=False)
            return

        if "only-if-cached" in req_cc:
            stored = await _safe(cache.get(key, value_type=StoredResponse))
            if isinstance(stored, StoredResponse) and self._acceptable(stored, req_cc):
                await self._send(scope, send, stored, hit=True)
            else:
                await self._send(scope, send, _gateway_timeout(cache.clock()), hit=False)
            return

        response, hit = await self._lookup(scope, receive, key, sorted(names))
        if hit and not self._acceptable(response, req_cc):  # the request's max-age is stricter
            response, hit = await self._reload(scope, receive, key, sorted(names)), False
        await self._send(scope, send, response, hit=hit)

    def _acceptable(self, stored: StoredResponse, req_cc: dict[str, str | None]) -> bool:
        limit = _seconds(req_cc, "max-age")
        return limit is None or stored.age(self.cache.clock()) <= limit

    async def _lookup(
        self, scope: Scope, receive: Receive, key: str, names: list[str]
    ) -> tuple[StoredResponse, bool]:
        """get_cached with the rule's windows; a stale answer outside its own window is refused."""
        rule = self.rule
        mine: list[Any] = []  # what this request's own load produced (response or exception)
        origin_scope = _origin_scope(scope)

        async def load() -> StoredResponse:
            try:
                response = await self._fetch(origin_scope, None)
            except BaseException as exc:
                mine.append(exc)
                raise
            mine.append(response)
            return response if response.storable else _pass_marker(response, self.default_ttl)

        options: dict[str, Any] = {
            "ttl": self.default_ttl,
            "stale_ttl": max(rule.stale_while_revalidate, rule.stale_if_error),
            "tags": self._tags(scope),
            "swr": rule.stale_while_revalidate > 0,
            "fail_safe": rule.stale_if_error > 0,
            "value_type": StoredResponse,
        }
        for attempt in range(2):
            found = await self.cache.lookup(key, load, **options)
            response = found.value
            if not isinstance(response, StoredResponse):  # not ours (someone else's key?)
                return await self._pass(scope, receive, key), False
            if response.status == 0:  # hit-for-pass: the handler's answers are not shareable
                if found.source == Source.LOADED and mine and isinstance(mine[0], StoredResponse):
                    return mine[0], False
                # a marker, or a joined load whose answer may not be shared: ask the handler
                return await self._pass(scope, receive, key), False
            age = response.age(self.cache.clock())
            if found.source == Source.STALE_SWR and age > response.ttl + response.swr and attempt == 0:
                options["swr"] = False  # past the SWR window: wait for the refresh just started
                continue
            failed = mine[0] if mine and isinstance(mine[0], BaseException) else None
            past_window = age > response.ttl + response.sie
            if found.source == Source.STALE_FAILSAFE and failed is not None and past_window:
                raise failed  # past the stale-if-error window: the error stands
            if found.source == Source.LOADED:
                await self._after_load(key, response, names, scope)
            return response, found.source != Source.LOADED
        raise AssertionError("unreachable")

    async def _pass(self, scope: Scope, receive: Receive, key: str) -> StoredResponse:
        """Run the handler for this request alone; a storable answer replaces the pass marker."""
        response = await self._origin(scope, receive)
        if response.storable:
            await _safe(self.cache.set(key, response, **self._lifetimes(response, scope)))
        return response

    async def _reload(self, scope: Scope, receive: Receive, key: str, names: list[str]) -> StoredResponse:
        """Revalidate with the handler now (request no-cache / max-age=0) and store the result."""
        try:
            response = await self._fetch(_origin_scope(scope), receive)
        except _OriginError as exc:
            return exc.response
        if response.storable:
            await _safe(self.cache.set(key, response, **self._lifetimes(response, scope)))
            await self._after_load(key, response, names, scope, stored=True)
        else:  # what is stored is obsolete: the handler's current answer may not be shared
            await _safe(self.cache.set(key, _pass_marker(response, self.default_ttl), ttl=self.default_ttl))
        return response

    def _tags(self, scope: Scope) -> list[str]:
        tags = [self.http_cache.path_tag(scope.get("root_path", "") + scope["path"])]
        return tags + [self.http_cache.user_tag(_fill(t, scope)) for t in self.rule.tags]

    def _lifetimes(self, response: StoredResponse, scope: Scope) -> dict[str, Any]:
        return {"ttl": response.ttl, "stale_ttl": max(response.swr, response.sie), "tags": self._tags(scope)}

    async def _after_load(
        self, key: str, response: StoredResponse, names: list[str], scope: Scope, *, stored: bool = False
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
            await _safe(self.cache.set(right, response, **self._lifetimes(response, scope)))
            return
        if not stored and (
            response.ttl != self.default_ttl
            or max(response.swr, response.sie)
            != max(self.rule.stale_while_revalidate, self.rule.stale_if_error)
        ):
            await _safe(self.cache.set(key, response, **self._lifetimes(response, scope)))

    async def _fetch(self, origin_scope: Scope, receive: Receive | None) -> StoredResponse:
        """Run the handler; its response (``storable`` says if it may be shared), or _OriginError."""
        status, raw, body, too_big = await _run_origin(self.app, origin_scope, receive, self.rule.max_body)
        response = self._build(status, raw, body, too_big)
        if status >= 500:
            raise _OriginError(response)
        return response

    async def _origin(self, scope: Scope, receive: Receive) -> StoredResponse:
        """Run the handler for this request only (nothing is stored)."""
        status, raw, body, too_big = await _run_origin(
            self.app, _origin_scope(scope), receive, self.rule.max_body
        )
        return self._build(status, raw, body, too_big)

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
        response = StoredResponse(
            status=status,
            headers=headers,
            body=body,
            etag=etag or "",
            stored_at=self.cache.clock(),
            ttl=float(ttl or 0),
            swr=float(swr),
            sie=float(sie),
            vary=all_vary,
        )
        response.storable = storable
        return response

    async def _send(self, scope: Scope, send: Send, response: StoredResponse, *, hit: bool) -> None:
        """Send ``response`` (or a 304 when the request's If-None-Match matches it)."""
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        if response.etag:
            headers.append((b"etag", response.etag.encode("latin-1")))
        if hit:
            age = int(response.age(self.cache.clock()))
            headers.append((b"age", str(age).encode()))
        inm = _header(scope, b"if-none-match")
        if (
            inm is not None
            and response.etag
            and 200 <= response.status < 300
            and if_none_match_matches(inm, response.etag)
        ):
            kept = [(k, v) for k, v in headers if k in _KEPT_ON_304 or k == b"age"]
            await send({"type": "http.response.start", "status": 304, "headers": kept})
            await send({"type": "http.response.body", "body": b""})
            return
        headers.append((b"content-length", str(len(response.body)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        body = b"" if scope["method"] == "HEAD" else response.body
        await send({"type": "http.response.body", "body": body})


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
        log.warning("tiercache: HTTP cache operation failed; serving without it", exc_info=True)
        return None


# --- write endpoints -------------------------------------------------------------------------------


class _WriteRoute:
    """The route app of an ``evict`` / ``put`` endpoint: invalidates after a 2xx, before its end."""

    def __init__(self, http_cache: HttpCache, app: ASGIApp, spec: tuple[Any, ...]) -> None:
        self.http_cache = http_cache
        self.app = app
        self.spec = spec

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0
        start: Message | None = None
        chunks: list[bytes] = []
        done = False
        put = self.spec[0] == "put"

        async def relay(message: Message) -> None:
            nonlocal status, start, done
            if message["type"] == "http.response.start":
                status = message["status"]
                if put:
                    start = message
                    return
            elif message["type"] == "http.response.body" and not done:
                last = not message.get("more_body", False)
                if put:
                    chunks.append(message.get("body", b""))
                    if not last:
                        return
                if last:
                    done = True
                    if 200 <= status < 300:
                        await self._after_success(scope, start, b"".join(chunks))
                    if put and start is not None:
                        await send(start)
                        message = {"type": "http.response.body", "body": b"".join(chunks)}
            await send(message)

        await self.app(scope, receive, relay)

    async def _after_success(self, scope: Scope, start: Message | None, body: bytes) -> None:
        http_cache = self.http_cache
        try:
            if self.spec[0] == "evict":
                await http_cache.evict_paths(*(_fill(p, scope) for p in self.spec[1]))
                await http_cache.evict_tags(*(_fill(t, scope) for t in self.spec[2]))
                return
            path = _fill(self.spec[1], scope)
            await http_cache.evict_paths(path)
            await http_cache.evict_tags(*(_fill(t, scope) for t in self.spec[2]))
            assert start is not None
            await self._store(scope, path, start, body)
        except ConfigurationError:
            raise
        except Exception:
            log.warning("tiercache: HTTP cache invalidation failed", exc_info=True)

    async def _store(self, scope: Scope, path: str, start: Message, body: bytes) -> None:
        """Store this write's response as the GET representation of ``path``, if some cached GET
        route serves that path and the response is storable under its rule."""
        get_scope = dict(scope)
        get_scope.update(method="GET", path=path, query_string=b"")
        for route, _ in self.http_cache._cached_routes:
            match, child = route.matches(get_scope)
            if match.name != "FULL":
                continue
            target = route.app
            if not isinstance(target, _CachedRoute):
                return
            get_scope.update(child)
            if start["status"] == 204 or not body:
                return
            # only what describes the representation itself carries over from the write's answer
            headers = [
                (k, v)
                for k, v in start.get("headers", ())
                if bytes(k).lower().startswith(b"content-") or bytes(k).lower() in (b"etag", b"vary")
            ]
            response = target._build(200, headers, body, False)
            if response.storable:
                # written after the path's invalidation, so (clock permitting) it is newer than it;
                # if the clock has not moved, the entry is simply invalid: a miss, never stale data
                key = _variant_key(self.http_cache._base_key(get_scope), get_scope, response.vary)
                await target.cache.set(key, response, **target._lifetimes(response, get_scope))
            return
