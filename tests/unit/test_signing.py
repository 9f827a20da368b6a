"""SignedCodec: round trip, rotation, tampering, unknown keys, pickle only when signed, no key in repr."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import time
import uuid

import pytest

from tiercache import ConfigurationError, Entry, SerializationError, TieredCache
from tiercache._events import Event
from tiercache.adapters.memory import MemoryTier
from tiercache.signing import SignedCodec
from tiercache.testing import FakeClock, FakeRemoteTier, make_entry

NEW = b"new-key-" + b"n" * 24
OLD = b"old-key-" + b"o" * 24
OTHER = b"someone-else-" + b"x" * 19


def test_round_trip_is_a_json_document_whose_body_is_the_plain_envelope() -> None:
    codec = SignedCodec([NEW])
    e = make_entry("ns:k", {"a": [1, 2.5, "x"]}, 1_767_225_600.0, ttl=30, tags=("t",), version=7)
    data = codec.dumps(e)
    assert codec.loads(data) == e
    doc = json.loads(data)  # what a Worker's JSON.parse sees
    assert doc["tcs"] == 1 and doc["fmt"] == "j" and doc["kid"] == codec.signing_key_id
    assert doc["body"]["v"] == {"a": [1, 2.5, "x"]} and doc["body"]["k"] == "ns:k"
    assert data[:116].endswith(b'"body":') and data.endswith(b"}")


def test_rotation_signs_with_the_first_key_and_accepts_every_listed_key() -> None:
    old_writer, rotated = SignedCodec([OLD]), SignedCodec([NEW, OLD])
    e = make_entry("ns:k", 1, time.time())
    assert rotated.loads(old_writer.dumps(e)) == e  # old records stay readable during rotation
    new_record = rotated.dumps(e)
    assert json.loads(new_record)["kid"] == SignedCodec([NEW]).signing_key_id
    with pytest.raises(SerializationError, match="key this codec does not hold"):
        old_writer.loads(new_record)
    with pytest.raises(SerializationError, match="key this codec does not hold"):
        SignedCodec([NEW]).loads(old_writer.dumps(e))  # the old key, once dropped, is refused


def test_unsigned_foreign_and_tampered_records_are_refused() -> None:
    codec = SignedCodec([NEW])
    e = make_entry("ns:k", {"admin": False}, time.time())
    data = codec.dumps(e)
    from tiercache import JsonCodec

    with pytest.raises(SerializationError):
        codec.loads(JsonCodec().dumps(e))  # an unsigned envelope
    with pytest.raises(SerializationError):
        SignedCodec([OTHER]).loads(data)
    forged = data.replace(b'"admin":false', b'"admin":true ')
    assert len(forged) == len(data) and forged != data
    with pytest.raises(SerializationError, match="signature does not match"):
        codec.loads(forged)
    # Swapping the format byte is covered by the signature as well.
    with pytest.raises(SerializationError):
        codec.loads(data.replace(b'"fmt":"j"', b'"fmt":"b"'))
    for cut in (0, 1, 50, 115, 116, len(data) - 1):
        with pytest.raises(SerializationError):
            codec.loads(data[:cut])


def test_every_single_byte_flip_is_refused() -> None:
    codec = SignedCodec([NEW])
    data = codec.dumps(make_entry("ns:k", [1, 2, 3], time.time()))
    for i in range(len(data)):
        mutated = bytearray(data)
        mutated[i] ^= 0x01
        with pytest.raises(SerializationError):
            codec.loads(bytes(mutated))


def test_keys_are_checked_and_never_shown() -> None:
    codec = SignedCodec([NEW, OLD])
    for text in (repr(codec), str(codec)):
        assert NEW.decode() not in text and OLD.decode() not in text and "n" * 24 not in text
    assert "redacted" in repr(codec)
    with pytest.raises(ConfigurationError):
        SignedCodec([])
    with pytest.raises(ConfigurationError):
        SignedCodec(NEW)  # type: ignore[arg-type]  # a bare key, not a list
    with pytest.raises(ConfigurationError):
        SignedCodec([b"short"])
    with pytest.raises(ConfigurationError):
        SignedCodec(["a text key of enough length"])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError):
        SignedCodec([NEW], JsonCodecLike(), pickle=True)


class JsonCodecLike:
    """A user codec (not JsonCodec): signed records then carry its bytes as base64."""

    def dumps(self, e: Entry) -> bytes:
        from tiercache import JsonCodec

        return JsonCodec().dumps(e)

    def loads(self, data: bytes) -> Entry:
        from tiercache import JsonCodec

        return JsonCodec().loads(data)


def test_a_custom_inner_codec_is_carried_as_base64() -> None:
    codec = SignedCodec([NEW], JsonCodecLike())
    e = make_entry("ns:k", "v", time.time())
    data = codec.dumps(e)
    assert json.loads(data)["fmt"] == "b" and isinstance(json.loads(data)["body"], str)
    assert codec.loads(data) == e


def test_pickle_round_trips_any_type_but_only_behind_the_signature() -> None:
    value = {"when": dt.datetime(2026, 1, 1, 12), "id": uuid.UUID(int=5), "amount": decimal.Decimal("1.10")}
    pickler = SignedCodec([NEW], pickle=True)
    e = make_entry("ns:k", value, time.time())
    data = pickler.dumps(e)
    back = pickler.loads(data)
    assert back.value == value and type(back.value["amount"]) is decimal.Decimal and back.typed
    assert json.loads(data)["fmt"] == "p"  # still a JSON document, the body is a base64 string
    with pytest.raises(SerializationError, match="not created with pickle=True"):
        SignedCodec([NEW]).loads(data)  # a JSON-only reader never unpickles, even when signed
    with pytest.raises(SerializationError):
        SignedCodec([OTHER], pickle=True).loads(data)
    mutated = data.replace(b'"body":"', b'"body":"A', 1)[:-2] + b'"}'
    with pytest.raises(SerializationError):
        pickler.loads(mutated)  # tampered pickle bytes never reach pickle.loads


def test_pickle_codec_refuses_unpicklable_values_with_a_serialisation_error() -> None:
    with pytest.raises(SerializationError, match="cannot pickle"):
        SignedCodec([NEW], pickle=True).dumps(make_entry("ns:k", lambda: 1, time.time()))


def test_a_cache_with_the_signed_codec_round_trips_typed_values_through_a_remote_tier() -> None:
    clock = FakeClock()
    remote = FakeRemoteTier()
    cache = TieredCache([MemoryTier(), remote], codec=SignedCodec([NEW]), clock=clock, namespace="sg")
    cache.sync.set("d", dt.date(2026, 3, 1))
    assert remote.store["sg:d"][0].startswith(b'{"tcs":1,')
    reader = TieredCache(
        [MemoryTier(), FakeRemoteTier(remote.store)],
        codec=SignedCodec([NEW, OLD]),
        clock=clock,
        namespace="sg",
    )
    assert reader.sync.get("d", value_type=dt.date) == dt.date(2026, 3, 1)


def test_a_tampered_value_in_a_fake_remote_tier_is_a_corrupt_miss_not_a_tier_error() -> None:
    events: list[Event] = []
    remote = FakeRemoteTier()
    cache = TieredCache(
        [MemoryTier(), remote], codec=SignedCodec([NEW]), namespace="sg", on_event=events.append
    )
    cache.sync.set("k", "genuine")
    data, until = remote.store["sg:k"]
    remote.store["sg:k"] = (data.replace(b"genuine", b"forgery"), until)
    fresh = TieredCache(  # another process: its own tier object on the same store
        [MemoryTier(), FakeRemoteTier(remote.store)],
        codec=SignedCodec([NEW]),
        namespace="sg",
        on_event=events.append,
    )
    assert fresh.sync.get_cached("k", lambda: "reloaded") == "reloaded"
    assert fresh.stats.tiers[1].corrupt == 1
    assert fresh.stats.tiers[1].errors == 0
