"""Bad input: fuzzed envelopes, corrupt bytes in Redis, odd keys, unserialisable and oversize values."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.kv_fake import ACCOUNT_ID, NAMESPACE_ID, TOKEN, FakeKV
from tests.redis_servers import purge_prefix
from tiercache import (
    Entry,
    InvalidKeyError,
    JsonCodec,
    SerializationError,
    TieredCache,
    ValueTooLargeError,
)
from tiercache._keys import MAX_KEY_LENGTH
from tiercache.adapters.cloudflare_kv import CloudflareKVTier
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier
from tiercache.signing import SignedCodec
from tiercache.testing import FakeRemoteTier, make_entry

KEY = b"fuzz-key-" + b"k" * 23
# Examples per fuzz test; their minimum counts (asserted) add up to over 10,000.
FUZZ = settings(
    max_examples=3000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)
VALID = JsonCodec().dumps(
    make_entry("ns:user:42", {"name": "Ada", "n": [1, 2.5, None, True]}, 1_767_225_600.0, tags=("users",))
)
SIGNED = SignedCodec([KEY]).dumps(make_entry("ns:k", [1, "two"], 1_767_225_600.0))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=6,
)


def decode_or_refuse(codec: Any, data: bytes) -> None:
    """The only acceptable outcomes: a well-formed Entry, or SerializationError."""
    try:
        entry = codec.loads(data)
    except SerializationError:
        return
    assert isinstance(entry, Entry)
    assert type(entry.key) is str and type(entry.version) is int
    assert all(type(t) is str for t in entry.tags)
    for t in (entry.created_at, entry.fresh_until, entry.stale_until):
        assert type(t) is float
    assert entry.fresh_until <= entry.stale_until


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, byte) edits: 0 flip, 1 insert, 2 delete, 3 truncate."""
    buf = bytearray(data)
    for kind, pos, byte in edits:
        if not buf:
            break
        i = pos % len(buf)
        if kind == 0:
            buf[i] ^= byte or 1
        elif kind == 1:
            buf.insert(i, byte)
        elif kind == 2:
            del buf[i]
        else:
            del buf[i:]
    return bytes(buf)


edits = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6
)
counts: dict[str, int] = {}


def run_counted(name: str, test: Any, at_least: int) -> None:
    counts[name] = 0
    test()
    assert counts[name] >= at_least, counts


def test_json_codec_survives_arbitrary_bytes() -> None:
    @settings(FUZZ, max_examples=4000)
    @given(st.binary(max_size=512))
    def fuzz(data: bytes) -> None:
        counts["bytes"] += 1
        decode_or_refuse(JsonCodec(), data)

    run_counted("bytes", fuzz, 4000)


def test_json_codec_survives_byte_level_mutations_of_a_valid_envelope() -> None:
    @FUZZ
    @given(edits)
    def fuzz(e: list[tuple[int, int, int]]) -> None:
        counts["mutated"] += 1
        decode_or_refuse(JsonCodec(), mutate(VALID, e))

    run_counted("mutated", fuzz, 3000)


FIELDS = ["tc", "k", "v", "c", "f", "s", "t", "n", "d", "extra"]


def test_json_codec_survives_any_json_in_any_envelope_field() -> None:
    @settings(FUZZ, max_examples=2000)
    @given(
        st.lists(st.tuples(st.sampled_from(FIELDS), json_values | st.just("<drop>")), min_size=1, max_size=4)
    )
    def fuzz(changes: list[tuple[str, Any]]) -> None:
        counts["fields"] += 1
        doc = orjson.loads(VALID)
        for name, value in changes:
            if value == "<drop>":
                doc.pop(name, None)
            else:
                doc[name] = value
        decode_or_refuse(JsonCodec(), orjson.dumps(doc))

    run_counted("fields", fuzz, 2000)


def test_signed_codec_survives_arbitrary_and_mutated_bytes_and_accepts_no_mutation() -> None:
    codec = SignedCodec([KEY])

    @settings(FUZZ, max_examples=1500)
    @given(st.binary(max_size=400))
    def arbitrary(data: bytes) -> None:
        counts["signed"] += 1
        with pytest.raises(SerializationError):
            codec.loads(data)

    @settings(FUZZ, max_examples=1500)
    @given(edits)
    def mutated(e: list[tuple[int, int, int]]) -> None:
        counts["signed"] += 1
        data = mutate(SIGNED, e)
        if data == SIGNED:
            return
        with pytest.raises(SerializationError):
            codec.loads(data)  # any change at all is refused: the HMAC covers every byte

    counts["signed"] = 0
    arbitrary()
    mutated()
    assert counts["signed"] >= 2900  # (a mutation that changes nothing is not counted as refused)


# --- the read path: corrupt bytes are a counted miss ------------------------------------------


@pytest.fixture
def redis_ns(shared_redis_url: str, redis_prefix: str) -> Iterator[tuple[str, str]]:
    yield shared_redis_url, redis_prefix
    purge_prefix(shared_redis_url, redis_prefix)


@pytest.mark.redis
def test_corrupt_bytes_in_redis_are_a_counted_miss_never_an_error(redis_ns: tuple[str, str]) -> None:
    url, prefix = redis_ns
    raw = redis.Redis.from_url(url)
    cache = TieredCache(
        [MemoryTier(), RedisTier(url=url, prefix=prefix)], namespace="bad", breaker_threshold=3, ttl=60
    )
    name = f"{prefix}:{{bad:k}}"
    seen = [0]
    try:

        @settings(FUZZ, max_examples=150)
        @given(st.binary(max_size=200) | edits.map(lambda e: b"tc1v%020d" % 1 + mutate(VALID, e)))
        def fuzz(data: bytes) -> None:
            seen[0] += 1
            cache.sync.delete("k")  # L1 and Redis (a tombstone), then our bytes over it
            raw.set(name, data)
            assert cache.sync.get_cached("k", lambda: "loaded") in ("loaded",)

        fuzz()
        stats = cache.stats.tiers[1]
        assert stats.corrupt >= seen[0] * 0.9  # (a mutation may leave a valid other-key record)
        assert stats.errors == 0 and stats.breaker_opened == 0  # bad bytes do not trip the breaker
    finally:
        cache.sync.close()
        raw.close()


@pytest.mark.redis
def test_a_signed_cache_rejects_tampered_and_unsigned_values_in_redis(redis_ns: tuple[str, str]) -> None:
    url, prefix = redis_ns
    raw = redis.Redis.from_url(url)
    codec = SignedCodec([KEY])
    writer = TieredCache([RedisTier(url=url, prefix=prefix)], namespace="sig", codec=codec)
    plain = TieredCache([RedisTier(url=url, prefix=prefix)], namespace="sig")
    try:
        writer.sync.set("role", "user")
        name = f"{prefix}:{{sig:role}}"
        stored = raw.get(name)
        assert isinstance(stored, bytes) and b'"fmt":"j"' in stored
        raw.set(name, stored.replace(b'"user"', b'"root"'))  # same length: only the HMAC notices
        reader = TieredCache([MemoryTier(), RedisTier(url=url, prefix=prefix)], namespace="sig", codec=codec)
        assert reader.sync.get_cached("role", lambda: "reloaded") == "reloaded"
        corrupt = reader.stats.tiers[1].corrupt
        assert corrupt >= 1 and reader.stats.tiers[1].errors == 0  # (read, then re-read under the lease)
        plain.sync.set("other", "unsigned")  # written without a signature
        assert reader.sync.get("other") is None
        assert reader.stats.tiers[1].corrupt == corrupt + 1
        reader.sync.close()
    finally:
        writer.sync.close()
        plain.sync.close()
        raw.close()


# --- keys ---------------------------------------------------------------------------------------

BAD_KEYS: list[Any] = ["", 42, b"bytes", None, ("a",), "x" * (MAX_KEY_LENGTH + 1)]


@pytest.mark.parametrize("key", BAD_KEYS, ids=["empty", "int", "bytes", "none", "tuple", "too-long"])
def test_invalid_keys_are_refused_by_every_call_before_any_tier(key: Any) -> None:
    remote = FakeRemoteTier()
    cache = TieredCache([MemoryTier(), remote], namespace="keys")
    for call in (
        lambda: cache.sync.get(key),
        lambda: cache.sync.get_cached(key, lambda: 1),
        lambda: cache.sync.set(key, 1),
        lambda: cache.sync.delete(key),
        lambda: cache.sync.expire(key),
    ):
        with pytest.raises(InvalidKeyError) as info:
            call()
        assert isinstance(info.value, ValueError)

    async def run() -> None:
        with pytest.raises(InvalidKeyError):
            await cache.get_cached(key, lambda: 1)
        with pytest.raises(InvalidKeyError):
            await cache.set(key, 1)
        with pytest.raises(InvalidKeyError):
            await cache.delete(key)

    asyncio.run(run())
    assert sum(remote.calls.values()) == 0 and remote.store == {}


ODD_KEYS = [
    "\x00nul",
    "line\nbreak\r\ttab",
    "\x7fdel\x1bescape",
    "ключ",
    "🙂 emoji",
    "a b/c?d#e%f&g=h",
    "{braces}",
    "x" * MAX_KEY_LENGTH,  # the longest allowed: hashed by Redis and KV, kept whole in the entry
]


class Str(str):
    """A str subclass: accepted (as a plain str)."""


@pytest.mark.redis
def test_odd_but_valid_keys_round_trip_through_redis_and_stay_distinct(redis_ns: tuple[str, str]) -> None:
    url, prefix = redis_ns
    writer = TieredCache([MemoryTier(), RedisTier(url=url, prefix=prefix)], namespace="odd")
    reader = TieredCache([MemoryTier(), RedisTier(url=url, prefix=prefix)], namespace="odd")
    try:
        for i, key in enumerate(ODD_KEYS):
            writer.sync.set(key, {"i": i})
        writer.sync.set(Str("plain"), "subclass")
        for i, key in enumerate(ODD_KEYS):
            assert reader.sync.get(key) == {"i": i}, repr(key[:20])
        assert reader.sync.get("plain") == "subclass"
        assert reader.stats.tiers[1].errors == 0 and reader.stats.tiers[1].corrupt == 0
    finally:
        writer.sync.close()
        reader.sync.close()


def test_odd_but_valid_keys_round_trip_through_the_kv_fake() -> None:
    with FakeKV() as fake:

        def make() -> CloudflareKVTier:
            return CloudflareKVTier(
                account_id=ACCOUNT_ID, namespace_id=NAMESPACE_ID, api_token=TOKEN, base_url=fake.base_url
            )

        writer = TieredCache([make()], namespace="odd")
        reader = TieredCache([MemoryTier(), make()], namespace="odd")
        for i, key in enumerate(ODD_KEYS):
            writer.sync.set(key, i)
        for i, key in enumerate(ODD_KEYS):
            assert reader.sync.get(key) == i, repr(key[:20])
        writer.sync.close()
        reader.sync.close()
        assert fake.violations == []


# --- values -------------------------------------------------------------------------------------


class Opaque:
    pass


def self_referencing() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@dataclasses.dataclass
class Undeclared:
    x: int


# (Integers beyond 64 bits are values now: the tagged form stores them as {"$int": "..."}.)
UNSERIALISABLE = [
    Opaque(),
    {"f": lambda: 1},
    self_referencing(),
    {1j: "complex key"},
    [Undeclared(1)],  # a user class with no declared type would come back elsewhere as a dict
    float("nan"),
    {"d": Decimal("sNaN")},
]


@pytest.mark.parametrize(
    "value",
    UNSERIALISABLE,
    ids=["object", "lambda", "cycle", "complex-key", "undeclared-class", "nan", "decimal-snan"],
)
def test_values_that_cannot_be_serialised_raise_and_leave_the_cache_untouched(value: Any) -> None:
    remote = FakeRemoteTier()
    memory = MemoryTier()
    cache = TieredCache([memory, remote], namespace="val")
    cache.sync.set("k", "before")
    writes = remote.calls["set"]
    with pytest.raises(SerializationError) as info:
        cache.sync.set("k", value)
    assert isinstance(info.value, TypeError)
    assert remote.calls["set"] == writes  # no tier was touched
    assert cache.sync.get("k") == "before"
    with pytest.raises(SerializationError):
        asyncio.run(cache.set("k", value))
    with pytest.raises(SerializationError):
        cache.sync.get_cached("new", lambda: value)  # a loader's result is checked the same way
    assert cache.sync.get("new") is None and "val:new" not in remote.store
    assert len(memory) == 1


def test_a_memory_only_cache_holds_any_object() -> None:
    cache = TieredCache([MemoryTier()], namespace="val")
    thing = Opaque()
    cache.sync.set("k", thing)
    assert cache.sync.get("k") is thing


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, [1.0, math.nan], {"a": {"b": math.inf}}])
def test_non_finite_floats_are_refused_rather_than_changed(value: object) -> None:
    remote = FakeRemoteTier()
    cache = TieredCache([MemoryTier(), remote], namespace="nan")
    with pytest.raises(SerializationError, match="NaN or infinity"):
        cache.sync.set("k", value)
    assert remote.store == {} and cache.sync.get("k") is None
    cache.sync.set("ok", [None, 1.5, {"x": None}])  # real nulls are fine
    assert cache.sync.get("ok") == [None, 1.5, {"x": None}]


def test_oversize_values_per_tier() -> None:
    remote = FakeRemoteTier(max_value_bytes=2_000)
    memory = MemoryTier(max_value_bytes=500)
    cache = TieredCache([memory, remote], namespace="big")
    cache.sync.set("mid", "m" * 1_000)  # too big for memory, fine for the remote tier
    assert "big:mid" in remote.store and len(memory) == 0
    assert cache.sync.get("mid") == "m" * 1_000
    with pytest.raises(ValueTooLargeError, match="too large"):
        cache.sync.set("huge", "h" * 10_000)  # no tier takes it
    assert "big:huge" not in remote.store and cache.sync.get("huge") is None
    memory_only = TieredCache([MemoryTier(max_value_bytes=500)], namespace="big")
    with pytest.raises(ValueTooLargeError):
        memory_only.sync.set("huge", "h" * 10_000)
    # A loader's oversize result is still returned, just not cached.
    assert cache.sync.get_cached("loaded", lambda: "l" * 10_000) == "l" * 10_000
    assert "big:loaded" not in remote.store


def test_oversize_values_are_refused_by_the_kv_tier_before_any_request() -> None:
    with FakeKV() as fake:
        kv = CloudflareKVTier(
            account_id=ACCOUNT_ID,
            namespace_id=NAMESPACE_ID,
            api_token=TOKEN,
            base_url=fake.base_url,
            max_value_bytes=1_000,
        )
        cache = TieredCache([kv], namespace="big")
        cache.sync.set("small", "s")
        before = fake.stats.requests
        with pytest.raises(ValueTooLargeError):
            cache.sync.set("huge", "h" * 5_000)
        assert fake.stats.requests == before
        cache.sync.close()
