"""Sans-I/O Cloudflare Workers KV REST protocol: builds requests and parses responses, no network.

Everything here is pure: a builder returns a :class:`KVRequest` (method, percent-encoded path,
query, headers, body) and a parser takes ``(status, headers, body)`` and returns data or raises a
:class:`KVError`. The tier in ``cloudflare_kv.py`` adds the I/O (httpx, sync and async), the request
budget, retries and the per-key write pacing. Facts about the API (limits, shapes, status codes)
follow Cloudflare's KV documentation and its OpenAPI description (``tests/data/``).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from tiercache.tier import ConfigurationError, TierError, ValueTooLargeError, hashed_key

__all__ = [
    "BULK_GET_MAX_KEYS",
    "BULK_WRITE_MAX_BYTES",
    "BULK_WRITE_MAX_ITEMS",
    "DEFAULT_BASE_URL",
    "KVError",
    "KVProtocol",
    "KVRateLimited",
    "KVRequest",
    "KeyPage",
    "BulkResult",
    "BulkWriteItem",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "MIN_EXPIRATION_TTL",
    "kv_key_for",
    "encode_key_segment",
    "parse_retry_after",
]

DEFAULT_BASE_URL = "https://api.cloudflare.com/client/v4"
MAX_KEY_BYTES = 512  # UTF-8 bytes of the decoded key name
MAX_VALUE_BYTES = 25 * 1024 * 1024  # 25 MiB
MIN_EXPIRATION_TTL = 60  # seconds; KV rejects anything shorter
BULK_GET_MAX_KEYS = 100
BULK_WRITE_MAX_ITEMS = 10_000  # also the bulk delete limit
# The documented request limit is "less than 100 megabytes"; keep headroom for JSON framing.
BULK_WRITE_MAX_BYTES = 95_000_000
LIST_LIMIT_MAX = 1000

KEY_NOT_FOUND = 10009  # Cloudflare's error code for a missing key (404)
NAMESPACE_NOT_FOUND = 10013

_RESERVED_NAMES = frozenset({"", ".", ".."})
_HASH_MARK = "#h:"


# --- keys ---------------------------------------------------------------------------------------


def _storable_as_is(key: str) -> bool:
    """True when Cloudflare documents ``key`` as a valid name: printable, no whitespace, not reserved.

    ``str.isprintable`` is False for control characters, lone surrogates and every Unicode
    separator except the ASCII space, which ``isspace`` then catches with the other whitespace.
    """
    return key not in _RESERVED_NAMES and key.isprintable() and not any(c.isspace() for c in key)


def kv_key_for(key: str) -> str:
    """The KV key name a cache key is stored under. Deterministic, so other readers can compute it.

    Invariant: the result is a valid KV name (non-empty, not ``.``/``..``, printable, no
    whitespace, at most 512 UTF-8 bytes). Keys that are already valid and short enough are used
    unchanged; keys over 512 bytes go through ``tiercache._keys.hashed_key`` (readable prefix +
    ``#h:`` + SHA-256 of the whole key). A key KV cannot hold as it is (whitespace, control
    characters, ``.``/``..``, empty) becomes its longest valid leading part (so the namespace
    prefix survives for listing) + ``#h:`` + SHA-256 of its UTF-8 bytes. The stored entry keeps the
    original key, so a reader detects the (astronomically unlikely) collision.
    """
    if _storable_as_is(key):
        return hashed_key(key, MAX_KEY_BYTES)
    raw = key.encode("utf-8", "surrogatepass")
    end = 0
    while end < len(key) and key[end].isprintable() and not key[end].isspace():
        end += 1
    keep = MAX_KEY_BYTES - len(_HASH_MARK) - 64
    prefix = key[:end].encode("utf-8")[:keep].decode("utf-8", "ignore")
    return f"{prefix}{_HASH_MARK}{hashlib.sha256(raw).hexdigest()}"


def encode_key_segment(name: str) -> str:
    """``name`` percent-encoded as one URL path segment (everything but unreserved characters).

    ``/``, ``?``, ``#``, ``%``, spaces and non-ASCII are all escaped, so the key can neither
    change the route nor end the path. ``.`` stays literal, which is why ``kv_key_for`` never
    returns ``.`` or ``..`` (a proxy could otherwise normalise the segment away).
    """
    return quote(name, safe="")


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVRequest:
    """One HTTP request to send. ``path`` is already percent-encoded and relative to the base URL."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    op: str = ""  # a short name for logs and stats ("read", "write", "bulk_get", ...)

    def url(self, base_url: str) -> str:
        return base_url.rstrip("/") + self.path


@dataclass(frozen=True)
class BulkWriteItem:
    """One pair of a bulk write. ``value`` is the exact bytes to store."""

    key: str  # the KV key name (see ``kv_key_for``)
    value: bytes
    expiration_ttl: int
    metadata: Any = None


def _json_body(doc: Any) -> bytes:
    return orjson.dumps(doc)


_JSON_HEADERS = (("Content-Type", "application/json"), ("Accept", "application/json"))


class KVProtocol:
    """Request builders for one namespace. Holds no credentials: the tier adds the auth header."""

    def __init__(self, account_id: str, namespace_id: str) -> None:
        for label, value in (("account_id", account_id), ("namespace_id", namespace_id)):
            if not value or not isinstance(value, str):
                raise ConfigurationError(f"CloudflareKVTier needs a non-empty {label}")
        self.account_id = account_id
        self.namespace_id = namespace_id
        self._prefix = (
            f"/accounts/{encode_key_segment(account_id)}/storage/kv/namespaces/"
            f"{encode_key_segment(namespace_id)}"
        )

    def _value_path(self, name: str) -> str:
        _check_name(name)
        return f"{self._prefix}/values/{encode_key_segment(name)}"

    def read_value(self, name: str) -> KVRequest:
        """GET the raw bytes of one key (parse with ``parse_read_value``)."""
        return KVRequest(
            "GET", self._value_path(name), headers=(("Accept", "application/octet-stream"),), op="read"
        )

    def write_value(
        self,
        name: str,
        value: bytes,
        *,
        expiration_ttl: int,
        metadata: Any = None,
        boundary: str | None = None,
    ) -> KVRequest:
        """PUT one value with ``expiration_ttl``: a raw body, or multipart when there is metadata."""
        check_value_size(name, value)
        ttl = check_expiration_ttl(expiration_ttl)
        params = (("expiration_ttl", str(ttl)),)
        path = self._value_path(name)
        if metadata is None:
            return KVRequest(
                "PUT",
                path,
                params,
                (("Content-Type", "application/octet-stream"), ("Accept", "application/json")),
                value,
                op="write",
            )
        meta = _json_body(metadata)
        if len(meta) > 1024:
            raise ValueTooLargeError(f"KV metadata for {name!r} is {len(meta)} bytes; the limit is 1024")
        body, content_type = encode_multipart(value, meta, boundary)
        return KVRequest(
            "PUT",
            path,
            params,
            (("Content-Type", content_type), ("Accept", "application/json")),
            body,
            op="write",
        )

    def delete_value(self, name: str) -> KVRequest:
        """DELETE one key. No body is sent (as wrangler does); deleting a missing key succeeds."""
        return KVRequest(
            "DELETE", self._value_path(name), headers=(("Accept", "application/json"),), op="delete"
        )

    def bulk_get(self, names: Sequence[str], *, with_metadata: bool = False) -> KVRequest:
        """POST ``/bulk/get`` for at most 100 keys, values as text (``type: "text"``)."""
        if len(names) > BULK_GET_MAX_KEYS:
            raise ValueError(f"bulk get takes at most {BULK_GET_MAX_KEYS} keys, got {len(names)}")
        for name in names:
            _check_name(name)
        doc = {"keys": list(names), "type": "text", "withMetadata": with_metadata}
        return KVRequest(
            "POST", f"{self._prefix}/bulk/get", (), _JSON_HEADERS, _json_body(doc), op="bulk_get"
        )

    def bulk_write(self, items: Sequence[BulkWriteItem]) -> KVRequest:
        """PUT ``/bulk`` for at most 10,000 pairs. Values that are not UTF-8 go as base64."""
        if len(items) > BULK_WRITE_MAX_ITEMS:
            raise ValueError(f"bulk write takes at most {BULK_WRITE_MAX_ITEMS} pairs, got {len(items)}")
        return KVRequest(
            "PUT",
            f"{self._prefix}/bulk",
            (),
            _JSON_HEADERS,
            _json_body([_bulk_doc(i) for i in items]),
            op="bulk_write",
        )

    def bulk_delete(self, names: Sequence[str]) -> KVRequest:
        """POST ``/bulk/delete`` (the current route; ``DELETE /bulk`` is deprecated) for ≤ 10,000 keys."""
        if len(names) > BULK_WRITE_MAX_ITEMS:
            raise ValueError(f"bulk delete takes at most {BULK_WRITE_MAX_ITEMS} keys, got {len(names)}")
        for name in names:
            _check_name(name)
        return KVRequest(
            "POST",
            f"{self._prefix}/bulk/delete",
            (),
            _JSON_HEADERS,
            _json_body(list(names)),
            op="bulk_delete",
        )

    def list_keys(
        self, *, prefix: str | None = None, cursor: str | None = None, limit: int = 1000
    ) -> KVRequest:
        """GET ``/keys``: one page. Repeat ``prefix`` on every page and pass the previous cursor."""
        if not 10 <= limit <= LIST_LIMIT_MAX:
            raise ValueError("list limit must be between 10 and 1000")
        params: list[tuple[str, str]] = [("limit", str(limit))]
        if prefix:
            params.append(("prefix", prefix))
        if cursor:
            params.append(("cursor", cursor))
        return KVRequest(
            "GET", f"{self._prefix}/keys", tuple(params), (("Accept", "application/json"),), op="list"
        )


def _check_name(name: str) -> None:
    # Builders take KV names (the output of kv_key_for); refuse anything that is not one, so a
    # bug upstream shows up here instead of as a 4xx or, worse, a request to another route.
    if not _storable_as_is(name):
        raise ValueError(f"not a valid KV key name: {name!r} (use kv_key_for)")
    if len(name.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"KV key name longer than {MAX_KEY_BYTES} bytes (use kv_key_for)")


def check_value_size(name: str, value: bytes, limit: int = MAX_VALUE_BYTES) -> None:
    if len(value) > limit:
        raise ValueTooLargeError(
            f"value for KV key {name[:80]!r} is {len(value)} bytes; the limit is {limit} bytes"
        )


def check_expiration_ttl(ttl: float) -> int:
    """Whole seconds, at least 60 (what KV accepts). The entry's own times keep shorter lives right."""
    return max(MIN_EXPIRATION_TTL, math.ceil(ttl))


def _bulk_doc(item: BulkWriteItem) -> dict[str, Any]:
    _check_name(item.key)
    check_value_size(item.key, item.value)
    doc: dict[str, Any] = {"key": item.key, "expiration_ttl": check_expiration_ttl(item.expiration_ttl)}
    try:
        doc["value"] = item.value.decode("utf-8")
    except UnicodeDecodeError:
        doc["value"] = base64.b64encode(item.value).decode("ascii")
        doc["base64"] = True
    if item.metadata is not None:
        doc["metadata"] = item.metadata
    return doc


def bulk_write_batches(items: Sequence[BulkWriteItem]) -> Iterator[list[BulkWriteItem]]:
    """Split pairs into requests within both bulk limits (10,000 pairs, ~100 MB of body)."""
    batch: list[BulkWriteItem] = []
    size = 0
    for item in items:
        # Upper bound of the item's JSON size: base64 grows 4/3, escaping can double ASCII text.
        cost = 2 * len(item.value) + len(item.key) * 6 + 128
        if batch and (len(batch) >= BULK_WRITE_MAX_ITEMS or size + cost > BULK_WRITE_MAX_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += cost
    if batch:
        yield batch


def chunks(seq: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def encode_multipart(value: bytes, metadata_json: bytes, boundary: str | None = None) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with a ``value`` part and a JSON ``metadata`` part."""
    while boundary is None or boundary.encode("ascii") in value or boundary.encode("ascii") in metadata_json:
        boundary = "tiercache-" + secrets.token_hex(16)
    b = boundary.encode("ascii")
    body = b"".join(
        [
            b"--",
            b,
            b"\r\n",
            b'Content-Disposition: form-data; name="value"; filename="value"\r\n',
            b"Content-Type: application/octet-stream\r\n\r\n",
            value,
            b"\r\n",
            b"--",
            b,
            b"\r\n",
            b'Content-Disposition: form-data; name="metadata"\r\n',
            b"Content-Type: application/json\r\n\r\n",
            metadata_json,
            b"\r\n",
            b"--",
            b,
            b"--\r\n",
        ]
    )
    return body, f"multipart/form-data; boundary={boundary}"


# --- responses ----------------------------------------------------------------------------------


# API tokens of live tiers. Every KVError message is scrubbed of them: a server or proxy that
# echoes the Authorization header back must not put the token into logs, events or tracebacks.
_SECRETS: set[str] = set()


def register_secret(secret: str) -> None:
    if len(secret) >= 8:  # scrubbing a very short string would mangle ordinary text
        _SECRETS.add(secret)


def scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "<redacted>")
    return text


class KVError(TierError):
    """A KV request failed. ``retryable`` for 408/5xx; ``codes`` are Cloudflare's error codes."""

    def __init__(
        self,
        message: str,
        *,
        tier: str = "kv",
        status: int | None = None,
        codes: tuple[int, ...] = (),
        retryable: bool = False,
    ) -> None:
        super().__init__(tier, scrub(message))
        self.status = status
        self.codes = codes
        self.retryable = retryable


class KVRateLimited(KVError):
    """429, or the tier refused to send because of a Retry-After or a spent request budget."""

    def __init__(
        self, message: str, *, tier: str = "kv", retry_after: float | None = None, status: int | None = 429
    ) -> None:
        super().__init__(message, tier=tier, status=status, retryable=False)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Envelope:
    """The ``{success, errors, messages, result}`` wrapper, read leniently (missing parts default)."""

    success: bool
    errors: tuple[tuple[int, str], ...] = ()
    messages: tuple[tuple[int, str], ...] = ()
    result: Any = None
    result_info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def codes(self) -> tuple[int, ...]:
        return tuple(code for code, _ in self.errors)

    def describe(self) -> str:
        return "; ".join(f"{code}: {msg}" for code, msg in self.errors)[:300] or "no error detail"


def _messages(raw: Any) -> tuple[tuple[int, str], ...]:
    out: list[tuple[int, str]] = []
    if isinstance(raw, list):
        for item in raw:
            if isinstance(item, Mapping):
                code = item.get("code")
                out.append((code if isinstance(code, int) else 0, str(item.get("message", ""))))
            elif isinstance(item, str):
                out.append((0, item))
    return tuple(out)


def parse_envelope(status: int, body: bytes) -> Envelope:
    """Read an envelope; anything that is not one becomes ``success = (status is 2xx)``."""
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, Mapping):
        return Envelope(success=200 <= status < 300)
    success = doc.get("success")
    info = doc.get("result_info")
    return Envelope(
        success=bool(success) if isinstance(success, bool) else 200 <= status < 300,
        errors=_messages(doc.get("errors")),
        messages=_messages(doc.get("messages")),
        result=doc.get("result"),
        result_info=info if isinstance(info, Mapping) else {},
    )


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date, ``now`` as Unix time)."""
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def raise_for_status(
    status: int, headers: Mapping[str, str], body: bytes, *, op: str, tier: str = "kv", now: float = 0.0
) -> Envelope:
    """The parsed envelope of a 2xx response; a KVError (or KVRateLimited) for anything else."""
    env = parse_envelope(status, body)
    if 200 <= status < 300 and env.success:
        return env
    detail = env.describe()
    if status == 429:
        retry_after = parse_retry_after(headers, now)
        raise KVRateLimited(
            f"{op}: HTTP 429 rate limited (retry after {retry_after}s): {detail}",
            tier=tier,
            retry_after=retry_after,
        )
    retryable = status == 408 or status >= 500
    raise KVError(
        f"{op}: HTTP {status}: {detail}", tier=tier, status=status, codes=env.codes, retryable=retryable
    )


def parse_read_value(
    status: int, headers: Mapping[str, str], body: bytes, *, tier: str = "kv", now: float = 0.0
) -> bytes | None:
    """The stored bytes; None for a missing key (404, code 10009 or no code at all)."""
    if status == 200:
        return body  # a successful read is the raw value, never an envelope
    if status == 404:
        env = parse_envelope(status, body)
        if NAMESPACE_NOT_FOUND not in env.codes:
            return None
    raise_for_status(status, headers, body, op="read", tier=tier, now=now)
    raise KVError(f"read: unexpected HTTP {status}", tier=tier, status=status)  # 2xx but not 200


@dataclass(frozen=True)
class BulkResult:
    successful_key_count: int
    unsuccessful_keys: tuple[str, ...]


def parse_bulk_result(
    status: int, headers: Mapping[str, str], body: bytes, *, op: str, tier: str = "kv", now: float = 0.0
) -> BulkResult:
    """The bulk-result of a bulk write/delete. It may come with a 4xx too: a partial failure."""
    env = parse_envelope(status, body)
    result = env.result if isinstance(env.result, Mapping) else {}
    raw_keys = result.get("unsuccessful_keys")
    failed = tuple(k for k in raw_keys if isinstance(k, str)) if isinstance(raw_keys, list) else ()
    count = result.get("successful_key_count")
    if not (200 <= status < 300 and env.success) and not failed:
        raise_for_status(status, headers, body, op=op, tier=tier, now=now)
    return BulkResult(int(count) if isinstance(count, (int, float)) else 0, failed)


def parse_bulk_get(
    status: int, headers: Mapping[str, str], body: bytes, *, tier: str = "kv", now: float = 0.0
) -> dict[str, bytes | None]:
    """Key name → stored bytes (None: missing) from a text-typed bulk get."""
    env = raise_for_status(status, headers, body, op="bulk_get", tier=tier, now=now)
    result = env.result if isinstance(env.result, Mapping) else {}
    values = result.get("values")
    out: dict[str, bytes | None] = {}
    if not isinstance(values, Mapping):
        raise KVError("bulk_get: response has no values object", tier=tier, status=status)
    for name, value in values.items():
        if isinstance(value, Mapping) and "value" in value and "metadata" in value:
            value = value["value"]  # the withMetadata shape
        if value is None:
            out[name] = None
        elif isinstance(value, str):
            out[name] = value.encode("utf-8")
        else:  # a "json"-typed answer: re-encode (not byte-faithful; we always ask for text)
            out[name] = orjson.dumps(value)
    return out


@dataclass(frozen=True)
class KeyPage:
    """One page of a key listing. ``cursor`` is None on the last page; a page may be empty before it."""

    names: tuple[str, ...]
    cursor: str | None
    expirations: Mapping[str, float] = field(default_factory=dict)


def parse_list_keys(
    status: int, headers: Mapping[str, str], body: bytes, *, tier: str = "kv", now: float = 0.0
) -> KeyPage:
    env = raise_for_status(status, headers, body, op="list", tier=tier, now=now)
    names: list[str] = []
    expirations: dict[str, float] = {}
    if isinstance(env.result, list):
        for item in env.result:
            if isinstance(item, Mapping) and isinstance(item.get("name"), str):
                names.append(item["name"])
                exp = item.get("expiration")
                if isinstance(exp, (int, float)):
                    expirations[item["name"]] = float(exp)
    cursor = env.result_info.get("cursor")
    # Keep paging while the cursor is non-empty; "", null and a missing cursor all mean the end.
    return KeyPage(tuple(names), cursor if isinstance(cursor, str) and cursor else None, expirations)
