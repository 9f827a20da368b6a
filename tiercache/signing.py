"""SignedCodec: HMAC-SHA256-signed entries with key rotation, and pickle only behind the signature.

Use it as the cache's codec; every remote tier then stores signed bytes, and a value that was
tampered with, is unsigned, or was signed with a key not in ``keys`` is rejected on read
(``SerializationError``: the cache counts a ``corrupt`` event and treats it as a miss)::

    from tiercache.signing import SignedCodec

    codec = SignedCodec([new_key, old_key])          # sign with new_key, accept both
    cache = TieredCache([...], codec=codec)

Keys are ``bytes`` of at least 16 bytes (32 random bytes recommended: ``secrets.token_bytes(32)``).
To rotate: put the new key first and keep the old one after it until every entry written with it
has expired (its ``stale_until``), then drop it.

Stored format (version 1)
-------------------------
The signed record is itself a JSON object, so a Cloudflare Worker can still ``JSON.parse`` it and
read the ordinary envelope from ``body``. It is laid out byte for byte as::

    {"tcs":1,"kid":"<8 hex>","fmt":"<f>","sig":"<64 hex>","body":<body>}

* ``kid``: the first 8 hex digits of ``HMAC-SHA256(key, b"tiercache key id")``; it names the key
  that signed the record without revealing it (readers use it to pick the key to verify with).
* ``fmt``: one character. ``j``: ``body`` is the inner codec's output embedded as is (the default
  JSON envelope of ``tiercache._serde``, an object); ``b``: ``body`` is a JSON string holding the
  base64 of the inner codec's bytes (any other inner codec); ``p``: ``body`` is a JSON string
  holding the base64 of a pickle (only with ``pickle=True``).
* ``sig``: hex ``HMAC-SHA256(key, b"tiercache-signed\\x001\\x00" + fmt + b"\\x00" + body)`` over the
  exact bytes of ``body`` as stored, so verification never depends on re-serialising JSON.

The header before ``body`` has a fixed length (116 bytes), and the record ends with ``}``. A reader
checks the header literally, verifies the signature with ``hmac.compare_digest``, and only then
decodes ``body``. A Worker that trusts its KV can read ``JSON.parse(text).body``; one that wants to
verify recomputes the HMAC over the bytes between the header and the final ``}``.

Record headers
--------------
A tier that keeps fields outside the envelope signs them too: ``record_mac(key, header)`` is a
hex ``HMAC-SHA256(key, b"tiercache-record\\x001\\x00" + cache key + b"\\x00" + header)`` (a
different label, so it can never pass for an entry's signature). RedisTier appends it to its
tombstones (kind and version), and with a signing codec writes no unsigned expiry header; a value
record's header must match the version in its signed envelope.

Pickle
------
``SignedCodec(keys, pickle=True)`` stores values with :mod:`pickle` (any picklable type, exact
round trip). pickle runs code while loading, so it is offered *only* here: a record is unpickled
only after its signature verified with one of your keys, and only by a codec created with
``pickle=True`` (a JSON-only reader refuses a ``p`` record even when its signature is good). Anyone
holding a key can make every reader run code: guard the keys as you guard the servers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import pickle as _pickle
import re
from collections.abc import Sequence

from ._entry import Entry
from ._errors import ConfigurationError, SerializationError
from ._serde import Codec, JsonCodec

__all__ = ["MIN_KEY_BYTES", "SIGNED_FORMAT", "SignedCodec"]

SIGNED_FORMAT = 1
MIN_KEY_BYTES = 16
_KID_LABEL = b"tiercache key id"
_MAC_PREFIX = b"tiercache-signed\x001\x00"
_RECORD_PREFIX = b"tiercache-record\x001\x00"  # a distinct label: a record MAC is never an entry MAC
_HEADER = re.compile(rb'\{"tcs":1,"kid":"([0-9a-f]{8})","fmt":"([jbp])","sig":"([0-9a-f]{64})","body":')
_HEADER_LEN = len(b'{"tcs":1,"kid":"","fmt":"","sig":"","body":') + 8 + 1 + 64


def _kid(key: bytes) -> bytes:
    return hmac.new(key, _KID_LABEL, hashlib.sha256).hexdigest()[:8].encode("ascii")


def _mac(key: bytes, fmt: bytes, body: bytes) -> bytes:
    return hmac.new(key, _MAC_PREFIX + fmt + b"\x00" + body, hashlib.sha256).hexdigest().encode("ascii")


def _record_mac(key: bytes, cache_key: str, header: bytes) -> bytes:
    message = _RECORD_PREFIX + cache_key.encode("utf-8", "surrogatepass") + b"\x00" + header
    return hmac.new(key, message, hashlib.sha256).hexdigest().encode("ascii")


class _PickleCodec:
    """Entries as pickles. Never used on its own: only inside a SignedCodec(pickle=True)."""

    def dumps(self, entry: Entry) -> bytes:
        state = (
            entry.key,
            entry.value,
            entry.created_at,
            entry.fresh_until,
            entry.stale_until,
            tuple(entry.tags),
            entry.version,
            entry.delta,
        )
        try:
            return _pickle.dumps(state, protocol=_pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle value of type {type(entry.value).__qualname__} for key {entry.key!r}: "
                f"{type(exc).__name__}"
            ) from None

    def loads(self, data: bytes) -> Entry:
        try:
            state = _pickle.loads(data)  # only reached after the HMAC verified
            key, value, created, fresh, stale, tags, version, delta = state
            return Entry(
                key,
                value,
                created_at=float(created),
                fresh_until=float(fresh),
                stale_until=float(stale),
                tags=tuple(tags),
                version=int(version),
                delta=float(delta),
                typed=True,
            )
        except Exception as exc:
            raise SerializationError(f"signed pickle does not hold an entry ({type(exc).__name__})") from None


class SignedCodec:
    """A Codec that signs what ``inner`` (default: the JSON envelope) encodes. See the module doc.

    ``keys``: one or more secret keys (``bytes``, at least 16 bytes each); the first signs, all
    verify. ``pickle=True`` encodes values with pickle instead of ``inner`` (trusted keys only).
    """

    __slots__ = ("_fmt", "_inner", "_json", "_keys", "_pickle", "_signing_kid")

    def __init__(self, keys: Sequence[bytes], inner: Codec | None = None, *, pickle: bool = False) -> None:
        if isinstance(keys, (bytes, bytearray, str)):
            raise ConfigurationError("SignedCodec takes a list of keys, e.g. SignedCodec([key])")
        key_list = list(keys)
        if not key_list:
            raise ConfigurationError("SignedCodec needs at least one key")
        for k in key_list:
            if not isinstance(k, (bytes, bytearray)):
                raise ConfigurationError(f"SignedCodec keys are bytes, not {type(k).__qualname__}")
            if len(k) < MIN_KEY_BYTES:
                raise ConfigurationError(
                    f"SignedCodec keys must be at least {MIN_KEY_BYTES} bytes (use secrets.token_bytes(32))"
                )
        if pickle and inner is not None:
            raise ConfigurationError("SignedCodec: give either inner= or pickle=True, not both")
        self._keys: dict[bytes, bytes] = {}
        for k in key_list:
            self._keys.setdefault(_kid(bytes(k)), bytes(k))
        self._signing_kid = _kid(bytes(key_list[0]))
        self._json = JsonCodec()
        self._pickle = _PickleCodec() if pickle else None
        self._inner: Codec = inner if inner is not None else self._json
        if pickle:
            self._fmt = b"p"
        elif type(self._inner) is JsonCodec:
            self._fmt = b"j"
        else:
            self._fmt = b"b"

    def __repr__(self) -> str:
        inner = "pickle" if self._pickle is not None else type(self._inner).__name__
        return f"SignedCodec(keys=<{len(self._keys)} redacted>, inner={inner})"

    @property
    def signing_key_id(self) -> str:
        """The ``kid`` of the key new records are signed with (safe to log)."""
        return self._signing_kid.decode("ascii")

    def record_mac(self, key: str, header: bytes) -> bytes:
        """The hex MAC a tier stores beside a record header it writes outside the envelope (a
        Redis tombstone's kind and version): signed with the current key, bound to ``key``."""
        return _record_mac(self._keys[self._signing_kid], key, header)

    def verify_record(self, key: str, header: bytes, mac: bytes) -> bool:
        """Does ``mac`` sign ``header`` for ``key`` under any of this codec's keys?"""
        return any(hmac.compare_digest(_record_mac(k, key, header), mac) for k in self._keys.values())

    def dumps(self, entry: Entry) -> bytes:
        if self._pickle is not None:
            body = b'"' + base64.b64encode(self._pickle.dumps(entry)) + b'"'
        elif self._fmt == b"j":
            body = self._inner.dumps(entry)
        else:
            body = b'"' + base64.b64encode(self._inner.dumps(entry)) + b'"'
        sig = _mac(self._keys[self._signing_kid], self._fmt, body)
        return b"".join(
            (
                b'{"tcs":1,"kid":"',
                self._signing_kid,
                b'","fmt":"',
                self._fmt,
                b'","sig":"',
                sig,
                b'","body":',
                body,
                b"}",
            )
        )

    def loads(self, data: bytes) -> Entry:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SerializationError("signed entry: expected bytes")
        raw = bytes(data)
        match = _HEADER.match(raw)
        if match is None or len(raw) < _HEADER_LEN + 1 or raw[-1:] != b"}":
            raise SerializationError("not a signed tiercache entry")
        kid, fmt, sig = match.group(1), match.group(2), match.group(3)
        key = self._keys.get(kid)
        if key is None:
            raise SerializationError("signed entry: signed with a key this codec does not hold")
        body = raw[_HEADER_LEN:-1]
        if not hmac.compare_digest(_mac(key, fmt, body), sig):
            raise SerializationError("signed entry: signature does not match (tampered or foreign)")
        if fmt == b"j":
            return self._json.loads(body)
        payload = _unquote_base64(body)
        if fmt == b"p":
            if self._pickle is None:
                raise SerializationError(
                    "signed entry holds a pickle; this codec was not created with pickle=True"
                )
            return self._pickle.loads(payload)
        return self._inner.loads(payload)


def _unquote_base64(body: bytes) -> bytes:
    if len(body) < 2 or body[:1] != b'"' or body[-1:] != b'"':
        raise SerializationError("signed entry: body is not a base64 string")
    try:
        return base64.b64decode(body[1:-1], validate=True)
    except (binascii.Error, ValueError):
        raise SerializationError("signed entry: body is not valid base64") from None
