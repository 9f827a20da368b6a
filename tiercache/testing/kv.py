"""An in-memory fake of Cloudflare's Workers KV REST API for tests (``tiercache.testing``).

``FakeCloudflareKV`` keeps one namespace in a dict and answers the requests ``CloudflareKVTier``
sends -- values, metadata, bulk get/write/delete, key listing with cursors -- with Cloudflare's
envelope and limits: key names of at most 512 bytes, values of at most 25 MiB, ``expiration_ttl``
of at least 60 s, one write per key per second, and an account request budget past which every
call is answered 429 with ``Retry-After`` for a while. Faults are injected on demand
(``fail_next``), at a rate (``set_faults``), or for good (``down``): 429 with ``Retry-After``,
500, and timeouts.

``fake.tier(**options)`` is a ``CloudflareKVTier`` wired to it through httpx's ``MockTransport``
(no socket, no thread). The project's own tests also serve it on a real socket and validate
every request and response against Cloudflare's OpenAPI description (``tests/kv_fake``).
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

__all__ = ["API_ROOT", "FakeCloudflareKV", "Item", "KVStats", "Record", "TIMED_OUT"]

API_ROOT = "/client/v4"
FAKE_BASE_URL = "https://kv.fake.invalid" + API_ROOT
MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 25 * 1024 * 1024
MAX_BULK = 10_000
MIN_TTL = 60

Reply = tuple[int, dict[str, str], bytes]
TIMED_OUT: Any = object()  # ``handle``'s answer for an injected timeout: the front decides how

_ROUTE = re.compile(
    r"^/accounts/(?P<account>[^/]+)/storage/kv/namespaces/(?P<ns>[^/]+)"
    r"(?P<rest>/values/(?P<vkey>[^/]+)|/metadata/(?P<mkey>[^/]+)|/keys|/bulk|/bulk/delete|/bulk/get)$"
)


@dataclass
class Item:
    value: bytes
    expires: float | None  # Unix seconds by the fake's clock
    metadata: Any = None


@dataclass
class Record:
    """One request as the fake saw it."""

    t: float  # monotonic receipt time
    method: str
    route: str
    keys: tuple[str, ...]
    status: int = 0
    fault: str | None = None


@dataclass
class KVStats:
    requests: int = 0
    faults: dict[str, int] = field(default_factory=lambda: {"429": 0, "500": 0, "timeout": 0})
    budget_exceeded: int = 0  # requests past the budget (each answered 429 and blocking)
    retry_after_violations: int = 0  # requests sent although a Retry-After we sent still ran
    in_flight_during_block: int = 0  # arrived within ``in_flight_grace`` of a 429: sent before it
    write_rate_violations: int = 0  # writes to a key less than 1 s after the previous one


@dataclass(frozen=True)
class Route:
    """A request's path, matched: the OpenAPI route (``/values/{key_name}``...) and its parameters."""

    route: str
    params: dict[str, str]


class FakeCloudflareKV:
    """One Workers KV namespace in memory, answering the REST API. Thread-safe.

    ``tier(**options)`` builds a CloudflareKVTier that talks to it. Fault injection: ``down = True``
    (every call answers 500), ``fail_next(n, "429" | "500" | "timeout")``, or ``set_faults(rate)``
    for random faults among ``faults``. ``store`` holds the values, ``records`` every request.
    """

    account_id = "0" * 32
    namespace_id = "f" * 32

    def __init__(
        self,
        *,
        account_id: str | None = None,
        namespace_id: str | None = None,
        token: str = "fake-kv-token",
        budget: int = 1200,
        budget_window: float = 300.0,
        block_seconds: float | None = None,
        write_interval: float = 1.0,
        fault_rate: float = 0.0,
        faults: Iterable[str] = ("429", "500", "timeout"),
        fault_retry_after: int = 1,
        timeout_delay: float = 1.0,
        empty_list_pages: bool = False,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.account_id = account_id or type(self).account_id
        self.namespace_id = namespace_id or type(self).namespace_id
        self.token = token
        self.budget = budget
        self.budget_window = budget_window
        self.block_seconds = budget_window if block_seconds is None else block_seconds
        self.write_interval = write_interval
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        self.fault_retry_after = fault_retry_after
        self.timeout_delay = timeout_delay  # how long a socket front holds an injected timeout
        self.empty_list_pages = empty_list_pages
        self.clock = clock
        self.down = False
        self.store: dict[str, Item] = {}
        self.records: list[Record] = []
        self.stats = KVStats()
        self._forced: list[str] = []  # fail_next's queue of fault kinds
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._admitted: list[float] = []  # monotonic times of requests counted against the budget
        self._blocked_until = 0.0  # monotonic; while it runs every request gets 429
        self._blocked_from = 0.0  # when the current block began
        # Requests arriving this soon after a 429 was issued were in flight before the client
        # could read it (concurrent callers); they get 429 too but are not counted as violations.
        self.in_flight_grace = 0.5
        self._last_write: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"FakeCloudflareKV(keys={len(self.store)}, requests={self.stats.requests})"

    # --- use ----------------------------------------------------------------------------------

    def tier(self, **options: Any) -> Any:
        """A CloudflareKVTier talking to this fake in-process (httpx's MockTransport)."""
        from ..adapters.cloudflare_kv import CloudflareKVTier  # needs httpx: imported on use

        options.setdefault("base_url", FAKE_BASE_URL)
        return CloudflareKVTier(
            account_id=self.account_id,
            namespace_id=self.namespace_id,
            api_token=self.token,
            transport=self.transport(),
            async_transport=self.transport(),
            **options,
        )

    def transport(self) -> Any:
        """An ``httpx.MockTransport`` (sync and async) that this fake answers."""
        import httpx

        def answer(request: httpx.Request) -> httpx.Response:
            raw_path, _, raw_query = request.url.raw_path.decode("ascii").partition("?")
            headers = {k.title(): v for k, v in request.headers.items()}
            reply = self.handle(request.method, raw_path, raw_query, headers, request.read())
            if reply is TIMED_OUT:
                raise httpx.ReadTimeout("injected timeout", request=request)
            status, reply_headers, body = reply
            return httpx.Response(status, headers=reply_headers, content=body)

        return httpx.MockTransport(answer)

    def fail_next(self, count: int = 1, kind: str = "500") -> None:
        """Answer the next ``count`` requests with fault ``kind``: "429", "500" or "timeout"."""
        if kind not in ("429", "500", "timeout"):
            raise ValueError(f"unknown fault {kind!r}")
        with self._lock:
            self._forced += [kind] * count

    def set_faults(self, rate: float) -> None:
        with self._lock:
            self.fault_rate = rate

    def live_value(self, key: str) -> bytes | None:
        with self._lock:
            item = self._live(key)
            return None if item is None else item.value

    def budget_used(self) -> int:
        with self._lock:
            return self._window_count(time.monotonic())

    # --- requests -----------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, raw_query: str, headers: dict[str, str], body: bytes) -> Any:
        """Answer one request: a (status, headers, body) reply, or ``TIMED_OUT``."""
        arrival = time.monotonic()  # limits are judged on arrival
        matched = self.route(raw_path)
        if not isinstance(matched, Route):
            return matched
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        return self.serve(method.upper(), matched, query, headers, body, arrival)

    def route(self, raw_path: str) -> Route | Reply:
        """Match a raw (still percent-encoded) path: its Route, or the error reply."""
        match = _ROUTE.match(raw_path[len(API_ROOT) :]) if raw_path.startswith(API_ROOT) else None
        if match is None:
            return _failure(404, 7003, "No route for the URI")
        try:
            params = {
                "account_id": unquote(match["account"], errors="strict"),
                "namespace_id": unquote(match["ns"], errors="strict"),
            }
            key = match["vkey"] or match["mkey"]
            if key is not None:
                params["key_name"] = unquote(key, errors="strict")
        except UnicodeDecodeError:
            return _failure(400, 10001, "invalid path encoding")
        rest = match["rest"]
        route = "/values/{key_name}" if match["vkey"] else "/metadata/{key_name}" if match["mkey"] else rest
        return Route(route, params)

    def serve(
        self,
        method: str,
        matched: Route,
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
        arrival: float,
    ) -> Any:
        route, params = matched.route, matched.params
        if headers.get("Authorization") != f"Bearer {self.token}":
            return _failure(403, 10000, "Authentication error")
        if params["account_id"] != self.account_id or params["namespace_id"] != self.namespace_id:
            return _failure(404, 10013, "namespace not found")
        key = params.get("key_name")
        record = Record(arrival, method, route, (key,) if key is not None else ())
        with self._lock:
            self.records.append(record)
        gated = self._gate(record)
        if gated is TIMED_OUT:
            return gated
        if gated is not None:
            record.status = gated[0]
            return gated
        reply = self._operate(method, route, key, query, headers, body, record)
        record.status = reply[0]
        return reply

    # --- limits and faults ---------------------------------------------------------------------

    def _window_count(self, now: float) -> int:
        horizon = now - self.budget_window
        while self._admitted and self._admitted[0] <= horizon:
            self._admitted.pop(0)
        return len(self._admitted)

    def _gate(self, record: Record) -> Any:
        """Retry-After, budget and fault injection, in that order: a reply, ``TIMED_OUT``, or
        None to serve the request."""
        now = record.t
        with self._lock:
            self.stats.requests += 1
            if self.down:
                return _failure(500, 10002, "injected outage (down)")
            if now < self._blocked_until:
                if now - self._blocked_from < self.in_flight_grace:
                    self.stats.in_flight_during_block += 1
                else:
                    self.stats.retry_after_violations += 1
                return _rate_limited(self._blocked_until - now)
            if self._window_count(now) >= self.budget:
                # Cloudflare: over 1,200 requests in 5 minutes blocks every call for 5 minutes.
                self.stats.budget_exceeded += 1
                self._blocked_from, self._blocked_until = now, now + self.block_seconds
                return _rate_limited(self.block_seconds)
            self._admitted.append(now)
            kind = None
            if self._forced:
                kind = self._forced.pop(0)
            elif self.fault_rate and self._rng.random() < self.fault_rate:
                kind = self._rng.choice(self.faults)
            if kind is not None:
                self.stats.faults[kind] += 1
                record.fault = kind
                if kind == "429":
                    self._blocked_from, self._blocked_until = now, now + self.fault_retry_after
                    return _rate_limited(self.fault_retry_after)
                if kind == "500":
                    return _failure(500, 10002, "injected internal error")
        return TIMED_OUT if record.fault == "timeout" else None

    def _rate_ok(self, key: str, now: float) -> bool:
        """One write per key per ``write_interval``; every write attempt counts."""
        last = self._last_write.get(key)
        self._last_write[key] = now
        if last is not None and now - last < self.write_interval:
            self.stats.write_rate_violations += 1
            return False
        return True

    def _live(self, key: str) -> Item | None:
        item = self.store.get(key)
        if item is not None and item.expires is not None and item.expires <= self.clock():
            del self.store[key]
            return None
        return item

    # --- operations ------------------------------------------------------------------------

    def _operate(
        self,
        method: str,
        route: str,
        key: str | None,
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
        record: Record,
    ) -> tuple[int, dict[str, str], bytes]:
        now = record.t
        with self._lock:
            if key is not None:
                problem = _key_problem(key)
                if problem:
                    return _failure(414 if "long" in problem else 400, 10033, problem)
            if route == "/values/{key_name}" and key is not None:
                if method == "GET":
                    item = self._live(key)
                    if item is None:
                        return _failure(404, 10009, "get: 'key not found'")
                    extra = {"Expiration": str(int(item.expires))} if item.expires is not None else {}
                    return 200, {"Content-Type": "application/octet-stream", **extra}, item.value
                if method == "DELETE":
                    if not self._rate_ok(key, now):
                        return _rate_limited(1)
                    self.store.pop(key, None)
                    return _ok(None)
                if method == "PUT":
                    return self._put(key, query, headers, body, now)
            if route == "/metadata/{key_name}" and key is not None:
                item = self._live(key)
                if item is None:
                    return _failure(404, 10009, "get: 'key not found'")
                return _ok(item.metadata)
            doc = json.loads(body) if body else None
            if route == "/bulk" and method == "PUT":
                return self._bulk_write(doc, record, now)
            if route in ("/bulk/delete", "/bulk") and method in ("POST", "DELETE"):
                return self._bulk_delete(doc, record, now)
            if route == "/bulk/get":
                return self._bulk_get(doc, record)
            if route == "/keys":
                return self._list(query)
        return _failure(404, 7003, "No route for the URI")

    def _expiry(self, ttl: Any, expiration: Any) -> tuple[float | None, str | None]:
        now = self.clock()
        if ttl is not None:
            ttl = float(ttl)
            if ttl < MIN_TTL:
                return None, f"Invalid expiration_ttl of {ttl:g}. Expiration TTL must be at least 60."
            return now + ttl, None
        if expiration is not None:
            expiration = float(expiration)
            if expiration < now + MIN_TTL:
                return (
                    None,
                    f"Invalid expiration of {expiration:g}. "
                    "Expiration times must be at least 60 seconds in the future.",
                )
            return expiration, None
        return None, None

    def _put(
        self, key: str, query: dict[str, str], headers: dict[str, str], body: bytes, now: float
    ) -> tuple[int, dict[str, str], bytes]:
        expires, problem = self._expiry(query.get("expiration_ttl"), query.get("expiration"))
        if problem:
            return _failure(400, 10033, problem)
        content_type = headers.get("Content-Type", "")
        metadata = None
        if content_type.lower().startswith("multipart/form-data"):
            parts = _multipart(content_type, body)
            if "value" not in parts:
                return _failure(400, 10001, "multipart body has no value part")
            value = parts["value"]
            if "metadata" in parts and parts["metadata"].strip():
                metadata = json.loads(parts["metadata"])
                if len(json.dumps(metadata, separators=(",", ":"))) > 1024:
                    return _failure(413, 10043, "metadata is larger than 1024 bytes")
        else:
            value = body
        if len(value) > MAX_VALUE_BYTES:
            return _failure(413, 10043, "value is larger than 25 MiB")
        if not self._rate_ok(key, now):
            return _rate_limited(1)
        self.store[key] = Item(value, expires, metadata)
        return _ok(None)

    def _bulk_write(self, doc: Any, record: Record, now: float) -> tuple[int, dict[str, str], bytes]:
        if not isinstance(doc, list) or len(doc) > MAX_BULK:
            return _failure(400, 10001, "bulk write takes a JSON array of at most 10,000 pairs")
        record.keys = tuple(item["key"] for item in doc)
        failed: list[str] = []
        for item in doc:
            key = item["key"]
            problem = _key_problem(key)
            expires, ttl_problem = self._expiry(item.get("expiration_ttl"), item.get("expiration"))
            if problem or ttl_problem:
                return _failure(400, 10033, problem or ttl_problem or "")
            value = base64.b64decode(item["value"]) if item.get("base64") else item["value"].encode("utf-8")
            if len(value) > MAX_VALUE_BYTES:
                return _failure(413, 10043, "value is larger than 25 MiB")
            if not self._rate_ok(key, now):
                failed.append(key)
                continue
            self.store[key] = Item(value, expires, item.get("metadata"))
        return _ok({"successful_key_count": len(doc) - len(failed), "unsuccessful_keys": failed})

    def _bulk_delete(self, doc: Any, record: Record, now: float) -> tuple[int, dict[str, str], bytes]:
        if not isinstance(doc, list) or len(doc) > MAX_BULK:
            return _failure(400, 10001, "bulk delete takes a JSON array of at most 10,000 keys")
        record.keys = tuple(doc)
        failed = [k for k in doc if not self._rate_ok(k, now)]
        for k in doc:
            if k not in failed:
                self.store.pop(k, None)
        return _ok({"successful_key_count": len(doc) - len(failed), "unsuccessful_keys": failed})

    def _bulk_get(self, doc: Any, record: Record) -> tuple[int, dict[str, str], bytes]:
        keys = doc["keys"]
        if len(keys) > 100:
            return _failure(400, 10001, "bulk get takes at most 100 keys")
        record.keys = tuple(keys)
        as_json = doc.get("type", "text") == "json"
        with_metadata = bool(doc.get("withMetadata", False))
        values: dict[str, Any] = {}
        for key in keys:
            item = self._live(key)
            if item is None:
                values[key] = None
                continue
            value: Any = json.loads(item.value) if as_json else item.value.decode("utf-8", "replace")
            if with_metadata:
                value = {"value": value, "metadata": item.metadata}
                if item.expires is not None:
                    value["expiration"] = int(item.expires)
            values[key] = value
        return _ok({"values": values})

    def _list(self, query: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        prefix = query.get("prefix", "")
        limit = int(float(query.get("limit", "1000")))
        cursor = query.get("cursor") or ""
        state: dict[str, Any] = (
            json.loads(base64.urlsafe_b64decode(cursor)) if cursor else {"after": None, "empty": False}
        )
        if self.empty_list_pages and not state["empty"]:
            # A page with nothing on it but a cursor, as tombstones of expired keys can cause.
            nxt = {"after": state["after"], "empty": True}
            return _ok([], result_info={"count": 0, "cursor": _cursor(nxt)})
        names = sorted(
            (k for k in list(self.store) if k.startswith(prefix) and self._live(k) is not None),
            key=lambda k: k.encode("utf-8"),
        )
        if state["after"] is not None:
            after = state["after"].encode("utf-8")
            names = [n for n in names if n.encode("utf-8") > after]
        page, more = names[:limit], len(names) > limit
        result = []
        for name in page:
            item = self.store[name]
            entry: dict[str, Any] = {"name": name}
            if item.expires is not None:
                entry["expiration"] = int(item.expires)
            if item.metadata is not None:
                entry["metadata"] = item.metadata
            result.append(entry)
        nxt_cursor = _cursor({"after": page[-1], "empty": False}) if more else ""
        return _ok(result, result_info={"count": len(result), "cursor": nxt_cursor})


def _cursor(state: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode("ascii")


def _key_problem(key: str) -> str | None:
    if key in ("", ".", ".."):
        return "key names cannot be empty, '.' or '..'"
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        return f"UTF-8 encoded length of {size} exceeds key length limit of 512 (too long)"
    if not key.isprintable() or any(c.isspace() for c in key):
        return "key names may contain printable, non-whitespace characters only"
    return None


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    parts: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            parts[name] = payload
    return parts


def _json(status: int, doc: Any, extra: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(extra or {})}, json.dumps(doc).encode()


def _ok(result: Any, result_info: Mapping[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    doc: dict[str, Any] = {"success": True, "errors": [], "messages": [], "result": result}
    if result_info is not None:
        doc["result_info"] = dict(result_info)
    return _json(200, doc)


def _failure(status: int, code: int, message: str) -> tuple[int, dict[str, str], bytes]:
    return _json(
        status,
        {"success": False, "errors": [{"code": code, "message": message}], "messages": [], "result": None},
    )


def _rate_limited(seconds: float) -> tuple[int, dict[str, str], bytes]:
    wait = max(1, math.ceil(seconds))  # Cloudflare sends whole seconds, rounded up
    status, headers, body = _failure(429, 10429, "rate limited")
    return status, {**headers, "Retry-After": str(wait)}, body
