"""CloudflareKVTier: a shared tier on Cloudflare Workers KV over its REST API (httpx, sync and async).

Theory of operation
-------------------
Every operation is written once, as a generator ("flow") that yields I/O actions (send this
request, sleep this long) and returns the result; ``_run`` drives it with ``httpx.Client`` and
``_arun`` with ``httpx.AsyncClient`` (one per event loop). Request shapes live in the sans-I/O
``_kv_protocol`` module. Around every request attempt (``_call``):

* the **request budget** is checked first: a sliding window of at most ``budget`` sends in any
  ``budget_window`` seconds (default 1,200 per 300 s, Cloudflare's account-wide REST limit). When
  it is spent the call raises ``KVRateLimited`` at once; nothing ever waits for budget. A sliding
  log rather than a refilling token bucket, because a bucket of capacity C refilled over the
  window admits up to 2C requests in one window, and Cloudflare blocks *everything* for five
  minutes when the limit is crossed.
* a **429** records Cloudflare's ``Retry-After``; until it passes every call raises at once.
* **5xx, 408 and transport errors** (timeouts, resets) are retried ``retries`` times with full
  jitter, inside an overall ``deadline``; then the call raises ``KVError``.

Writes to one key are **paced** to at most one per ``write_interval`` (KV allows one write per key
per second). A write or delete that comes too soon is **coalesced**: it waits in a per-key slot
where a newer version replaces an older one, and a background thread sends it when the key's
window opens. Reads of that key in this process see the pending write (read-your-writes). A
back-fill of the very version this process just wrote is dropped (it would only spend budget).

Versions: KV has no compare-and-set, so fencing is best effort and in-process only. The tier
remembers (bounded) the newest version it wrote, deleted or read per key and refuses a ``set`` of
an older version and a ``delete`` older than a known write. Across processes the last writer wins;
the core fences in-process as well, and readers check the entry's own times.

KV is eventually consistent (up to ~60 s across locations): this tier never offers a lease and is
never used for distributed single-flight; after ``delete`` other edges may serve the old value
until the change propagates. Entries live in KV for ``max(60 s, stale_until - now)`` (KV's floor);
the entry's own times make shorter lifetimes exact, since ``get`` treats anything past
``stale_until`` (by the bound clock) as a miss.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
import time
import urllib.parse
import weakref
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, fields
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from tiercache.tier import (
    ConfigurationError,
    Entry,
    Event,
    EventKind,
    SerializationError,
    TierBinding,
    emit_safely,
)

from ._kv_protocol import (
    BULK_GET_MAX_KEYS,
    DEFAULT_BASE_URL,
    MAX_VALUE_BYTES,
    BulkWriteItem,
    KVError,
    KVProtocol,
    KVRateLimited,
    KVRequest,
    bulk_write_batches,
    check_expiration_ttl,
    check_value_size,
    chunks,
    kv_key_for,
    parse_bulk_get,
    parse_bulk_result,
    parse_list_keys,
    parse_read_value,
    parse_retry_after,
    raise_for_status,
    register_secret,
)

if TYPE_CHECKING:
    import httpx

__all__ = ["CloudflareKVTier", "KVStats", "kv_key_for"]  # kv_key_for: the KV name a Worker reads

logger = logging.getLogger("tiercache.cloudflare_kv")

T = TypeVar("T")
_Reply = tuple[int, Mapping[str, str], bytes]


def _import_httpx() -> ModuleType:
    try:
        import httpx
    except ImportError:
        raise ImportError("CloudflareKVTier needs httpx: pip install 'tiercache-py[cloudflare]'") from None
    return httpx


class _Secret:
    """Holds the API token; its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


@dataclass(frozen=True)
class _Send:
    request: KVRequest
    timeout: float


@dataclass(frozen=True)
class _Sleep:
    seconds: float


_Action = _Send | _Sleep
_Flow = Generator[_Action, Any, T]


@dataclass
class KVStats:
    """Counters, for tests and metrics. Read them; do not write."""

    requests: int = 0  # attempts sent (each one spent budget)
    retries: int = 0
    rate_limited: int = 0  # 429 answers received
    skipped_retry_after: int = 0  # calls refused locally while a Retry-After runs
    skipped_budget: int = 0  # calls refused locally because the budget was spent
    deferred_writes: int = 0  # writes/deletes parked because the key's 1 s window was closed
    coalesced_writes: int = 0  # parked writes replaced by a newer one before being sent
    dropped_backfills: int = 0  # writes of the version this process had just stored
    fenced_writes: int = 0  # writes/deletes refused because a newer version is known
    deferred_failures: int = 0  # parked writes that failed when finally sent

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Budget:
    """At most ``limit`` takes in any ``window`` seconds (a sliding log of send times)."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._sent: list[float] = []  # ascending; trimmed from the front
        self._head = 0
        self._lock = threading.Lock()

    def _trim(self, now: float) -> None:
        sent, head, horizon = self._sent, self._head, now - self.window
        while head < len(sent) and sent[head] <= horizon:
            head += 1
        if head > 1024 and head * 2 > len(sent):
            del sent[:head]
            head = 0
        self._head = head

    def try_take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._trim(now)
            if len(self._sent) - self._head >= self.limit:
                return False
            self._sent.append(now)
            return True

    def used(self) -> int:
        with self._lock:
            self._trim(self._clock())
            return len(self._sent) - self._head


@dataclass
class _Known:
    """What this process last knew of a key in KV: a version, and until when its copy is stored."""

    version: int
    stored_until: float  # monotonic; 0 when nothing (a delete) or unknown


@dataclass
class _Pending:
    """A write (``entry`` set) or delete (``entry`` None) waiting for the key's window to open."""

    key: str
    name: str
    version: int
    entry: Entry | None
    due: float  # monotonic


_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: a header value as is


def _checked_token(token: str | None) -> str:
    """The API token with surrounding whitespace removed; ConfigurationError (never showing the
    token) when it is missing or holds characters an HTTP header cannot carry as they are."""
    if token is None or not isinstance(token, str) or not token.strip():
        raise ConfigurationError("CloudflareKVTier needs api_token= or $CLOUDFLARE_API_TOKEN")
    token = token.strip()
    if not _TOKEN_CHARS.fullmatch(token):
        raise ConfigurationError(
            f"CloudflareKVTier: the API token ({len(token)} characters, not shown) holds spaces, "
            "control or non-ASCII characters; copy it again from the Cloudflare dashboard"
        )
    return token


def _check_base_url(base_url: str, allow_http: bool) -> None:
    """The token travels in a header: refuse plain http, except to this machine or when allowed."""
    parsed = urllib.parse.urlsplit(base_url)
    if parsed.scheme == "https":
        return
    if parsed.scheme != "http":
        raise ConfigurationError(f"CloudflareKVTier: base_url must be https://, not {parsed.scheme!r}")
    host = (parsed.hostname or "").lower()
    if allow_http or host in ("localhost", "127.0.0.1", "::1") or host.startswith("127."):
        return
    raise ConfigurationError(
        f"CloudflareKVTier: base_url {base_url!r} is plain http and would send the API token in "
        "clear text; use https, or pass allow_http=True for a trusted network"
    )


class _KeyRedactingFilter(logging.Filter):
    """Rewrites httpx's "HTTP Request: GET <url>" records: the key segment of a KV URL under one
    of ``prefixes`` (namespaces whose cache redacts keys) becomes ``<key>``."""

    def __init__(self) -> None:
        super().__init__()
        self.prefixes: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.prefixes and record.args:
            args = tuple(self._clean(a) for a in (record.args if isinstance(record.args, tuple) else ()))
            if args:
                record.args = args
        return True

    def _clean(self, arg: Any) -> Any:
        text = str(arg)
        for prefix in self.prefixes:
            at = text.find(prefix)
            if at >= 0:
                rest = text[at + len(prefix) :]
                for kind in ("values/", "metadata/"):
                    if rest.startswith(kind):
                        end = len(rest)
                        for stop in ("?", " ", '"'):
                            i = rest.find(stop, len(kind))
                            if i >= 0:
                                end = min(end, i)
                        return text[: at + len(prefix)] + kind + "<key>" + rest[end:]
        return arg


_httpx_filter: _KeyRedactingFilter | None = None
_httpx_filter_lock = threading.Lock()


def _redact_httpx_urls(prefix: str) -> None:
    """Keep keys of ``prefix``'s namespace out of httpx's INFO request log (process-wide filter on
    the "httpx" logger, installed once, matching only these KV URLs)."""
    global _httpx_filter
    with _httpx_filter_lock:
        if _httpx_filter is None:
            _httpx_filter = _KeyRedactingFilter()
            logging.getLogger("httpx").addFilter(_httpx_filter)
        _httpx_filter.prefixes.add(prefix)


class CloudflareKVTier:
    """A shared tier on Cloudflare Workers KV. See the module docstring for the behaviour.

    ``api_token`` defaults to ``$CLOUDFLARE_API_TOKEN``; it needs "Workers KV Storage Write".
    ``budget`` should be this process's share of the account-wide 1,200 requests per 5 minutes
    (it is counted per tier object; divide it when several processes or tools share the token).
    ``write_interval`` paces writes to one key; KV allows one per second, so keep it above 1 s
    (the default leaves 0.25 s for network and scheduling jitter) except against a test server.
    The token is stripped of surrounding whitespace and must be printable ASCII; ``base_url``
    must be https (plain http only to a loopback address, or with ``allow_http=True``).
    """

    in_process = False
    shared = True
    offers_lease = False  # eventually consistent: never arbitrates single-flight
    max_ttl: float | None = None

    def __init__(
        self,
        *,
        account_id: str,
        namespace_id: str,
        api_token: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        name: str = "kv",
        timeout: float = 1.5,
        deadline: float = 3.0,
        retries: int = 2,
        backoff: float = 0.1,
        budget: int = 1200,
        budget_window: float = 300.0,
        write_interval: float = 1.25,
        default_retry_after: float = 60.0,
        max_retry_after: float = 600.0,
        max_value_bytes: int = MAX_VALUE_BYTES,
        bulk_get: bool = True,
        write_metadata: bool = False,
        fence_entries: int = 10_000,
        monotonic: Callable[[], float] = time.monotonic,
        transport: Any = None,
        async_transport: Any = None,
        allow_http: bool = False,
        max_read_bytes: int | None = None,
    ) -> None:
        self._httpx = _import_httpx()
        token = _checked_token(api_token if api_token is not None else os.environ.get("CLOUDFLARE_API_TOKEN"))
        _check_base_url(base_url, allow_http)
        if not 0 < max_value_bytes <= MAX_VALUE_BYTES:
            raise ConfigurationError(f"max_value_bytes must be between 1 and {MAX_VALUE_BYTES}")
        if budget < 1 or budget_window <= 0:
            raise ConfigurationError("budget and budget_window must be positive")
        if timeout <= 0 or deadline <= 0 or retries < 0 or write_interval <= 0:
            raise ConfigurationError("timeout, deadline and write_interval must be positive, retries >= 0")
        self.name = name
        self.max_value_bytes = max_value_bytes
        # Values longer than this are never decoded (default: what this tier would write).
        self.max_read_bytes = max_value_bytes if max_read_bytes is None else max_read_bytes
        self.account_id = account_id
        self.namespace_id = namespace_id
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.deadline = deadline
        self.retries = retries
        self.backoff = backoff
        self.write_interval = write_interval
        self.default_retry_after = default_retry_after
        self.max_retry_after = max_retry_after
        self.use_bulk_get = bulk_get
        self.write_metadata = write_metadata
        self.stats = KVStats()
        self._proto = KVProtocol(account_id, namespace_id)
        self._token = _Secret(token)
        register_secret(token)
        self._mono = monotonic
        self._budget = _Budget(budget, budget_window, monotonic)
        self._binding = TierBinding()
        self._transport = transport
        self._async_transport = async_transport
        # One lock guards the per-key state below and the flusher's condition.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._blocked_until = 0.0  # monotonic; set from Retry-After
        self._fence_entries = fence_entries
        self._known: OrderedDict[str, _Known] = OrderedDict()  # bounded LRU, see _remember
        self._last_write: OrderedDict[str, float] = OrderedDict()  # name -> last send, oldest first
        self._pending: dict[str, _Pending] = {}
        self._flusher: threading.Thread | None = None
        self._client: httpx.Client | None = None
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return (
            f"CloudflareKVTier(name={self.name!r}, account_id={self.account_id!r}, "
            f"namespace_id={self.namespace_id!r}, base_url={self.base_url!r})"
        )

    def bind(self, binding: TierBinding) -> None:
        self._binding = binding
        if binding.redact_keys:
            _redact_httpx_urls(self._proto_path_prefix())

    def _proto_path_prefix(self) -> str:
        return f"/accounts/{self.account_id}/storage/kv/namespaces/{self.namespace_id}/"

    @property
    def budget_used(self) -> int:
        """Requests sent in the current budget window."""
        return self._budget.used()

    # --- clients ------------------------------------------------------------------------------

    def _client_options(self) -> dict[str, Any]:
        return {
            "headers": {
                "Authorization": f"Bearer {self._token.reveal()}",
                "User-Agent": "tiercache-cloudflare-kv",
            },
            "timeout": self.timeout,
            "follow_redirects": False,
        }

    def _sync_client(self) -> httpx.Client:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._httpx.Client(transport=self._transport, **self._client_options())
                client = self._client
        return client

    def _async_client(self) -> httpx.AsyncClient:
        # One client per event loop: a client's connections belong to the loop that opened them,
        # and a handler calling asyncio.run per invocation must not reuse a dead loop's pool.
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            with self._lock:
                client = self._aclients.get(loop)
                if client is None:
                    client = self._httpx.AsyncClient(
                        transport=self._async_transport, **self._client_options()
                    )
                    self._aclients[loop] = client
        return client

    # --- drivers --------------------------------------------------------------------------

    def _transport_error(self, request: KVRequest, exc: BaseException) -> KVError:
        # httpx messages name the URL at most, never headers; keep them short anyway.
        err = KVError(f"{request.op}: {type(exc).__name__}: {str(exc)[:200]}", tier=self.name, retryable=True)
        err.__cause__ = exc
        return err

    def _run(self, flow: _Flow[T]) -> T:
        httpx = self._httpx
        client = self._sync_client()
        try:
            action = next(flow)
            while True:
                if isinstance(action, _Sleep):
                    time.sleep(action.seconds)
                    action = flow.send(None)
                    continue
                req = action.request
                try:
                    resp = client.request(
                        req.method,
                        req.url(self.base_url),
                        params=req.params,
                        headers=req.headers,
                        content=req.body,
                        timeout=action.timeout,
                    )
                except httpx.HTTPError as exc:
                    action = flow.throw(self._transport_error(req, exc))
                    continue
                action = flow.send((resp.status_code, resp.headers, resp.content))
        except StopIteration as stop:
            return cast(T, stop.value)

    async def _arun(self, flow: _Flow[T]) -> T:
        httpx = self._httpx
        client = self._async_client()
        try:
            action = next(flow)
            while True:
                if isinstance(action, _Sleep):
                    await asyncio.sleep(action.seconds)
                    action = flow.send(None)
                    continue
                req = action.request
                try:
                    resp = await client.request(
                        req.method,
                        req.url(self.base_url),
                        params=req.params,
                        headers=req.headers,
                        content=req.body,
                        timeout=action.timeout,
                    )
                except httpx.HTTPError as exc:
                    action = flow.throw(self._transport_error(req, exc))
                    continue
                action = flow.send((resp.status_code, resp.headers, resp.content))
        except StopIteration as stop:
            return cast(T, stop.value)

    # --- one request: budget, Retry-After, retries ------------------------------------------

    def _admit(self, op: str) -> None:
        """Raise at once if the tier must not send now; else spend one unit of budget."""
        now = self._mono()
        blocked = self._blocked_until
        if now < blocked:
            self.stats.skipped_retry_after += 1
            raise KVRateLimited(
                f"{op}: skipped; Cloudflare asked to wait {blocked - now:.1f}s more",
                tier=self.name,
                retry_after=blocked - now,
                status=None,
            )
        if not self._budget.try_take():
            self.stats.skipped_budget += 1
            raise KVRateLimited(
                f"{op}: skipped; request budget of {self._budget.limit} per "
                f"{self._budget.window:g}s is spent",
                tier=self.name,
                status=None,
            )
        self.stats.requests += 1

    def _note_rate_limited(self, headers: Mapping[str, str]) -> None:
        wait = parse_retry_after(headers, time.time())
        wait = self.default_retry_after if wait is None else wait
        wait = min(wait, self.max_retry_after)
        self.stats.rate_limited += 1
        with self._lock:
            self._blocked_until = max(self._blocked_until, self._mono() + wait)
        logger.warning("%s: Cloudflare answered 429; skipping the tier for %.1fs", self.name, wait)

    def _call(self, req: KVRequest, paced: Sequence[str] = ()) -> _Flow[_Reply]:
        """Send ``req`` with budget, Retry-After and bounded retries; return the final reply.

        ``paced`` are KV names this request writes: every attempt counts as a write to each of
        them, so a retry waits until their one-write-per-second window has opened again.
        """
        start = self._mono()
        attempt = 0
        while True:
            self._admit(req.op)
            if paced:
                self._mark_written(paced)
            left = self.deadline - (self._mono() - start)
            try:
                reply: _Reply = yield _Send(req, max(0.05, min(self.timeout, left)))
            except KVError as exc:  # thrown in by the driver: a transport failure
                failure: KVError = exc
            else:
                status, headers, _body = reply
                if status == 429:
                    self._note_rate_limited(headers)
                    return reply  # the parser raises KVRateLimited; never retried here
                if status != 408 and status < 500:
                    return reply
                failure = KVError(f"{req.op}: HTTP {status}", tier=self.name, status=status, retryable=True)
            attempt += 1
            delay = random.uniform(0.0, self.backoff * (2**attempt))
            if paced:
                delay = max(delay, self.write_interval)
            if attempt > self.retries or (self._mono() - start) + delay >= self.deadline:
                raise KVError(
                    f"{req.op}: gave up after {attempt} attempt(s): {failure}",
                    tier=self.name,
                    status=failure.status,
                    retryable=True,
                ) from failure
            self.stats.retries += 1
            yield _Sleep(delay)

    # --- per-key state (callers hold self._lock unless noted) -------------------------------

    def _mark_written(self, names: Sequence[str]) -> None:
        now = self._mono()
        with self._lock:
            for name in names:
                self._touch(name, now)

    def _touch(self, name: str, now: float) -> None:
        """Record a write to ``name`` at ``now`` (caller holds the lock)."""
        lw = self._last_write
        lw[name] = now
        lw.move_to_end(name)
        # Forget windows that have closed; the dict stays as small as one second of writes.
        while lw:
            first = next(iter(lw))
            if now - lw[first] < self.write_interval:
                break
            del lw[first]

    def _window_due(self, name: str, now: float) -> float | None:
        """When ``name`` may be written next, or None if it may be written now."""
        last = self._last_write.get(name)
        if last is None or now - last >= self.write_interval:
            return None
        return last + self.write_interval

    def _remember(self, name: str, version: int, stored_until: float) -> None:
        known = self._known.get(name)
        if known is not None and known.version > version:
            return
        self._known[name] = _Known(version, stored_until)
        self._known.move_to_end(name)
        while len(self._known) > self._fence_entries:
            self._known.popitem(last=False)

    def _park(self, op: _Pending) -> None:
        """Coalesce a write/delete into the key's slot; the flusher thread sends it when due."""
        current = self._pending.get(op.name)
        if current is not None:
            if current.version > op.version:
                self.stats.fenced_writes += 1
                return
            self.stats.coalesced_writes += 1
            op.due = min(op.due, current.due)
        self._pending[op.name] = op
        self.stats.deferred_writes += 1
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(
                target=self._flush_loop, name=f"tiercache-{self.name}-flush", daemon=True
            )
            self._flusher.start()
        self._cond.notify_all()

    def _pending_view(self, key: str, name: str) -> tuple[bool, Entry | None]:
        """(True, what a read should see) when a write/delete of ``name`` is parked."""
        with self._lock:
            op = self._pending.get(name)
        if op is None:
            return False, None
        if op.entry is None or op.entry.key != key:
            return True, None
        return True, op.entry if op.entry.stale_until > self._binding.clock() else None

    # --- decoding -----------------------------------------------------------------------------

    def _decode(self, key: str, name: str, data: bytes) -> Entry | None:
        if len(data) > self.max_read_bytes:  # never decoded: see max_read_bytes
            error = SerializationError(f"value of {len(data)} bytes is over max_read_bytes")
            emit_safely(self._binding.on_event, Event(EventKind.CORRUPT, key, self.name, error=error))
            return None
        try:
            entry = self._binding.codec.loads(data)
        except SerializationError as exc:
            emit_safely(self._binding.on_event, Event(EventKind.CORRUPT, key, self.name, error=exc))
            return None
        if entry.key != key:  # a hashed name shared by two keys, or a foreign value
            return None
        with self._lock:
            self._remember(name, entry.version, 0.0)
        if entry.stale_until <= self._binding.clock():
            return None  # KV keeps entries at least 60 s; the entry's own expiry decides
        return entry

    # --- flows --------------------------------------------------------------------------------

    def _flow_get(self, key: str) -> _Flow[Entry | None]:
        name = kv_key_for(key)
        parked, entry = self._pending_view(key, name)
        if parked:
            return entry
        status, headers, body = yield from self._call(self._proto.read_value(name))
        data = parse_read_value(status, headers, body, tier=self.name, now=time.time())
        return None if data is None else self._decode(key, name, data)

    def _flow_get_many(self, keys: Sequence[str]) -> _Flow[list[Entry | None]]:
        out: list[Entry | None] = [None] * len(keys)
        wanted: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            name = kv_key_for(key)
            parked, entry = self._pending_view(key, name)
            if parked:
                out[i] = entry
            else:
                wanted.setdefault(name, []).append(i)
        names = list(wanted)
        if not self.use_bulk_get:
            for name in names:
                for i in wanted[name]:
                    out[i] = yield from self._flow_get(keys[i])
            return out
        for chunk in chunks(names, BULK_GET_MAX_KEYS):
            status, headers, body = yield from self._call(self._proto.bulk_get(chunk))
            values = parse_bulk_get(status, headers, body, tier=self.name, now=time.time())
            for name in chunk:
                data = values.get(name)
                if data is not None:
                    for i in wanted[name]:
                        out[i] = self._decode(keys[i], name, data)
        return out

    def _payload(self, entry: Entry) -> bytes:
        payload = entry.payload if entry.payload is not None else self._binding.codec.dumps(entry)
        check_value_size(entry.key, payload, self.max_value_bytes)
        return payload

    def _metadata(self, entry: Entry) -> Any:
        if not self.write_metadata:
            return None
        return {"tc": 1, "f": entry.fresh_until, "s": entry.stale_until, "n": entry.version}

    def _claim_write(self, key: str, entry: Entry) -> tuple[str, bytes, int] | None:
        """Decide a write: (name, payload, ttl) to send now, or None (dead, fenced, dropped, parked).

        Raises ValueTooLargeError before anything is sent.
        """
        remaining = entry.stale_until - self._binding.clock()
        if remaining <= 0:
            return None
        payload = self._payload(entry)
        name = kv_key_for(key)
        now = self._mono()
        with self._lock:
            known = self._known.get(name)
            if known is not None:
                if entry.version < known.version:
                    self.stats.fenced_writes += 1  # a newer write/delete/read is known
                    return None
                if entry.version == known.version and known.stored_until > now + 1:
                    self.stats.dropped_backfills += 1  # KV already holds this very version
                    return None
            due = self._window_due(name, now)
            if due is not None or name in self._pending:
                self._park(_Pending(key, name, entry.version, entry, due if due is not None else now))
                return None
            self._touch(name, now)  # reserve the window before sending
        return name, payload, check_expiration_ttl(remaining)

    def _flow_set(self, key: str, entry: Entry) -> _Flow[None]:
        claim = self._claim_write(key, entry)
        if claim is None:
            return
        name, payload, ttl = claim
        req = self._proto.write_value(name, payload, expiration_ttl=ttl, metadata=self._metadata(entry))
        status, headers, body = yield from self._call(req, paced=(name,))
        raise_for_status(status, headers, body, op="write", tier=self.name, now=time.time())
        with self._lock:
            self._remember(name, entry.version, self._mono() + ttl)

    def _flow_set_many(self, items: Sequence[tuple[str, Entry]]) -> _Flow[None]:
        claimed: list[tuple[BulkWriteItem, int]] = []
        for key, entry in items:
            claim = self._claim_write(key, entry)
            if claim is not None:
                name, payload, ttl = claim
                claimed.append((BulkWriteItem(name, payload, ttl, self._metadata(entry)), entry.version))
        if len(claimed) == 1:
            item, version = claimed[0]
            req = self._proto.write_value(
                item.key, item.value, expiration_ttl=item.expiration_ttl, metadata=item.metadata
            )
            status, headers, body = yield from self._call(req, paced=(item.key,))
            raise_for_status(status, headers, body, op="write", tier=self.name, now=time.time())
            with self._lock:
                self._remember(item.key, version, self._mono() + item.expiration_ttl)
            return
        versions = {item.key: version for item, version in claimed}
        failed: list[str] = []
        for batch in bulk_write_batches([item for item, _ in claimed]):
            names = [item.key for item in batch]
            status, headers, body = yield from self._call(self._proto.bulk_write(batch), paced=names)
            result = parse_bulk_result(
                status, headers, body, op="bulk_write", tier=self.name, now=time.time()
            )
            bad = set(result.unsuccessful_keys)
            failed.extend(result.unsuccessful_keys)
            with self._lock:
                for item in batch:
                    if item.key not in bad:
                        self._remember(item.key, versions[item.key], self._mono() + item.expiration_ttl)
        if failed:
            raise KVError(f"bulk_write: {len(failed)} key(s) were not stored", tier=self.name)

    def _claim_delete(self, key: str, version: int) -> str | None:
        name = kv_key_for(key)
        now = self._mono()
        with self._lock:
            known = self._known.get(name)
            if known is not None and known.version > version and known.stored_until > 0:
                self.stats.fenced_writes += 1  # this process knows of a newer write: keep it
                return None
            pending = self._pending.get(name)
            if pending is not None and pending.version > version:
                self.stats.fenced_writes += 1
                return None
            # A tombstone: later writes older than ``version`` are refused in this process.
            self._known[name] = _Known(version, 0.0)
            self._known.move_to_end(name)
            due = self._window_due(name, now)
            if due is not None or pending is not None:
                self._park(_Pending(key, name, version, None, due if due is not None else now))
                return None
            self._touch(name, now)
        return name

    def _flow_delete(self, key: str, version: int) -> _Flow[None]:
        name = self._claim_delete(key, version)
        if name is None:
            return
        status, headers, body = yield from self._call(self._proto.delete_value(name), paced=(name,))
        raise_for_status(status, headers, body, op="delete", tier=self.name, now=time.time())

    def _flow_pending(self, op: _Pending) -> _Flow[None]:
        """Send one parked write/delete whose window has opened."""
        if op.entry is None:
            req = self._proto.delete_value(op.name)
        else:
            remaining = op.entry.stale_until - self._binding.clock()
            if remaining <= 0:
                return
            ttl = check_expiration_ttl(remaining)
            req = self._proto.write_value(
                op.name, self._payload(op.entry), expiration_ttl=ttl, metadata=self._metadata(op.entry)
            )
        status, headers, body = yield from self._call(req, paced=(op.name,))
        raise_for_status(status, headers, body, op=req.op, tier=self.name, now=time.time())
        if op.entry is not None:
            with self._lock:
                self._remember(op.name, op.version, self._mono() + ttl)

    def _flow_list(self, prefix: str | None, page_size: int = 1000) -> _Flow[list[str]]:
        names: list[str] = []
        cursor: str | None = None
        while True:
            req = self._proto.list_keys(prefix=prefix, cursor=cursor, limit=page_size)
            status, headers, body = yield from self._call(req)
            page = parse_list_keys(status, headers, body, tier=self.name, now=time.time())
            names.extend(page.names)
            if page.cursor is None:  # an empty page with a cursor is not the end
                return names
            cursor = page.cursor

    def _flow_clear(self, prefix: str | None) -> _Flow[int]:
        prefix = f"{self._binding.namespace}:" if prefix is None else prefix
        if not prefix:
            raise ConfigurationError("clear() needs a non-empty prefix; it never empties a namespace")
        names = yield from self._flow_list(prefix)
        with self._lock:
            for name in names:
                self._pending.pop(name, None)
                self._known.pop(name, None)
            waits = [self._window_due(n, self._mono()) for n in names]
        due = max((w for w in waits if w is not None), default=None)
        if due is not None:
            yield _Sleep(max(0.0, due - self._mono()))
        for chunk in chunks(names, 10_000):
            status, headers, body = yield from self._call(self._proto.bulk_delete(chunk), paced=chunk)
            result = parse_bulk_result(
                status, headers, body, op="bulk_delete", tier=self.name, now=time.time()
            )
            if result.unsuccessful_keys:
                raise KVError(f"bulk_delete: {len(result.unsuccessful_keys)} key(s) remain", tier=self.name)
        return len(names)

    # --- the flusher thread ---------------------------------------------------------------

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._flusher = None
                    return
                now = self._mono()
                due = [op for op in self._pending.values() if op.due <= now]
                if not due:
                    self._cond.wait(min(op.due for op in self._pending.values()) - now)
                    continue
                for op in due:
                    # Record the send before freeing the slot: between the two, a caller would
                    # find neither a parked write nor a recent one, and send a second PUT at once.
                    self._touch(op.name, now)
                    del self._pending[op.name]
            for op in due:
                try:
                    self._run(self._flow_pending(op))
                except Exception as exc:  # nobody awaits a parked write: report it
                    self.stats.deferred_failures += 1
                    logger.debug("%s: deferred %s failed: %s", self.name, "write", exc)
                    emit_safely(
                        self._binding.on_event, Event(EventKind.TIER_ERROR, op.key, self.name, error=exc)
                    )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until parked writes are sent (at most ``timeout`` s). True when none remain."""
        limit = None if timeout is None else self._mono() + timeout
        while True:
            with self._lock:
                thread = self._flusher
                if not self._pending and (thread is None or not thread.is_alive()):
                    return True
            left = None if limit is None else limit - self._mono()
            if left is not None and left <= 0:
                return False
            if thread is not None:
                thread.join(left)

    # --- the Tier protocol: sync face -----------------------------------------------------

    def get(self, key: str) -> Entry | None:
        return self._run(self._flow_get(key))

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        return self._run(self._flow_get_many(keys)) if keys else []

    def set(self, key: str, entry: Entry) -> None:
        self._run(self._flow_set(key, entry))

    def set_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        if items:
            self._run(self._flow_set_many(items))

    def delete(self, key: str, version: int) -> None:
        """Delete ``key`` (unless this process knows of a newer write). Other Cloudflare
        locations may serve the old value until the delete propagates (up to ~60 s)."""
        self._run(self._flow_delete(key, version))

    def list_keys(self, prefix: str | None = None, *, page_size: int = 1000) -> list[str]:
        """KV key names starting with ``prefix`` (every page; costs one request per page)."""
        return self._run(self._flow_list(prefix, page_size))

    def clear(self, prefix: str | None = None) -> int:
        """Delete every key under ``prefix`` (default: this cache's namespace); returns how many."""
        return self._run(self._flow_clear(prefix))

    def close(self) -> None:
        """Send parked writes (bounded wait), then close the HTTP clients."""
        self.flush(self.write_interval + self.deadline + 0.5)
        with self._lock:
            client, self._client = self._client, None
            self._aclients = weakref.WeakKeyDictionary()  # their loops' own aclose() closes them
        if client is not None:
            client.close()

    # --- the Tier protocol: async face ----------------------------------------------------

    async def aget(self, key: str) -> Entry | None:
        return await self._arun(self._flow_get(key))

    async def aget_many(self, keys: Sequence[str]) -> list[Entry | None]:
        return await self._arun(self._flow_get_many(keys)) if keys else []

    async def aset(self, key: str, entry: Entry) -> None:
        await self._arun(self._flow_set(key, entry))

    async def aset_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        if items:
            await self._arun(self._flow_set_many(items))

    async def adelete(self, key: str, version: int) -> None:
        await self._arun(self._flow_delete(key, version))

    async def alist_keys(self, prefix: str | None = None, *, page_size: int = 1000) -> list[str]:
        return await self._arun(self._flow_list(prefix, page_size))

    async def aclear(self, prefix: str | None = None) -> int:
        return await self._arun(self._flow_clear(prefix))

    async def aclose(self) -> None:
        """Send parked writes (bounded wait, off the loop), then close this loop's client."""
        await asyncio.to_thread(self.flush, self.write_interval + self.deadline + 0.5)
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._aclients.pop(loop, None)
        if client is not None:
            await client.aclose()
