"""Unit tests of the sans-I/O Workers KV protocol module (no network)."""

from __future__ import annotations

import email.parser
import email.policy
import json
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiercache._errors import ValueTooLargeError
from tiercache.adapters._kv_protocol import (
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    BulkWriteItem,
    KVError,
    KVProtocol,
    KVRateLimited,
    bulk_write_batches,
    encode_key_segment,
    encode_multipart,
    kv_key_for,
    parse_bulk_get,
    parse_bulk_result,
    parse_envelope,
    parse_list_keys,
    parse_read_value,
    parse_retry_after,
)

PROTO = KVProtocol("acct", "ns")
PREFIX = "/accounts/acct/storage/kv/namespaces/ns"


def _valid_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and name.isprintable()
        and not any(c.isspace() for c in name)
        and len(name.encode("utf-8")) <= MAX_KEY_BYTES
    )


# --- keys ---------------------------------------------------------------------------------------


@given(st.text(max_size=700))
def test_every_key_maps_to_a_valid_kv_name(key: str) -> None:
    name = kv_key_for(key)
    assert _valid_name(name)
    assert kv_key_for(key) == name  # deterministic


@given(st.text(min_size=1, max_size=200))
def test_valid_short_keys_are_stored_unchanged(key: str) -> None:
    if _valid_name(key):
        assert kv_key_for(key) == key


@given(st.text(max_size=700))
def test_path_segment_round_trips_and_stays_one_segment(key: str) -> None:
    name = kv_key_for(key)
    segment = encode_key_segment(name)
    assert unquote(segment, errors="strict") == name
    assert not set(segment) & set("/?# ")
    assert segment.isascii()
    assert segment not in (".", "..")


@pytest.mark.parametrize("key", ["", ".", "..", "a b", "tab\tkey", "nl\n", "nbsp\u00a0x", "\ud800lone"])
def test_keys_kv_cannot_hold_are_hashed(key: str) -> None:
    name = kv_key_for(key)
    assert "#h:" in name and _valid_name(name)


def test_namespace_prefix_survives_hashing() -> None:
    assert kv_key_for("app:user 42").startswith("app:user#h:")
    long = "app:" + "x" * 600
    assert kv_key_for(long).startswith("app:xxx") and len(kv_key_for(long).encode()) <= MAX_KEY_BYTES
    assert kv_key_for(long) != kv_key_for(long + "y")


def test_awkward_characters_are_percent_encoded() -> None:
    req = PROTO.read_value("a/b?c#d%e:é")
    assert req.path == PREFIX + "/values/a%2Fb%3Fc%23d%25e%3A%C3%A9"
    assert req.method == "GET" and req.body is None


def test_builders_refuse_names_that_did_not_go_through_kv_key_for() -> None:
    for bad in ("", ".", "..", "a b", "x" * 513):
        with pytest.raises(ValueError):
            PROTO.read_value(bad)


# --- writes -------------------------------------------------------------------------------------


def test_raw_write_has_octet_stream_body_and_ttl_floor() -> None:
    req = PROTO.write_value("k", b"\x00\xffv", expiration_ttl=5)
    assert req.method == "PUT" and req.body == b"\x00\xffv"
    assert dict(req.params) == {"expiration_ttl": "60"}
    assert dict(req.headers)["Content-Type"] == "application/octet-stream"
    assert dict(PROTO.write_value("k", b"v", expiration_ttl=90.2).params)["expiration_ttl"] == "91"


def test_multipart_write_parses_back_to_value_and_metadata() -> None:
    value = b"--tricky\r\n\xff body"
    req = PROTO.write_value("k", value, expiration_ttl=60, metadata={"n": 1})
    content_type = dict(req.headers)["Content-Type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + (req.body or b"")
    )
    parts = {
        p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
        for p in msg.iter_parts()
    }  # type: ignore[attr-defined]
    assert parts == {"value": value, "metadata": b'{"n":1}'}


def test_boundary_never_occurs_in_the_value() -> None:
    body, content_type = encode_multipart(b"xx--b0--yy", b"{}", boundary="b0")
    boundary = content_type.split("boundary=")[1]
    assert boundary != "b0" and boundary.encode() not in b"xx--b0--yy"
    assert body.endswith(b"--" + boundary.encode() + b"--\r\n")


def test_too_large_value_is_refused_before_any_request() -> None:
    with pytest.raises(ValueTooLargeError):
        PROTO.write_value("k", b"x" * (MAX_VALUE_BYTES + 1), expiration_ttl=60)
    with pytest.raises(ValueTooLargeError):
        PROTO.write_value("k", b"x", expiration_ttl=60, metadata={"m": "x" * 1100})


def test_bulk_requests() -> None:
    get = PROTO.bulk_get(["a", "b/c"])
    assert (get.method, get.path) == ("POST", PREFIX + "/bulk/get")
    assert json.loads(get.body or b"") == {"keys": ["a", "b/c"], "type": "text", "withMetadata": False}
    with pytest.raises(ValueError):
        PROTO.bulk_get([f"k{i}" for i in range(101)])
    put = PROTO.bulk_write([BulkWriteItem("a", b"text", 10), BulkWriteItem("b", b"\xff\x00", 70, {"m": 1})])
    assert (put.method, put.path) == ("PUT", PREFIX + "/bulk")
    assert json.loads(put.body or b"") == [
        {"key": "a", "value": "text", "expiration_ttl": 60},
        {"key": "b", "value": "/wA=", "base64": True, "expiration_ttl": 70, "metadata": {"m": 1}},
    ]
    delete = PROTO.bulk_delete(["a", "b"])
    assert (delete.method, delete.path, json.loads(delete.body or b"")) == (
        "POST",
        PREFIX + "/bulk/delete",
        ["a", "b"],
    )
    with pytest.raises(ValueError):
        PROTO.bulk_delete(["k"] * 10_001)


def test_bulk_write_batches_respect_count_and_size() -> None:
    items = [BulkWriteItem(f"k{i}", b"v", 60) for i in range(25_001)]
    assert [len(b) for b in bulk_write_batches(items)] == [10_000, 10_000, 5_001]
    big = [BulkWriteItem(f"k{i}", b"x" * 20_000_000, 60) for i in range(5)]
    batches = list(bulk_write_batches(big))
    assert (
        all(sum(2 * len(i.value) for i in b) <= 95_000_000 for b in batches) and sum(map(len, batches)) == 5
    )


def test_list_request_repeats_prefix_and_passes_cursor() -> None:
    req = PROTO.list_keys(prefix="app:", cursor="abc", limit=10)
    assert req.path == PREFIX + "/keys"
    assert req.params == (("limit", "10"), ("prefix", "app:"), ("cursor", "abc"))


# --- responses ----------------------------------------------------------------------------------


def _env(success: bool, result: object, errors: list[dict[str, object]] | None = None) -> bytes:
    doc = {"success": success, "errors": errors or [], "messages": [], "result": result}
    return json.dumps(doc).encode()


def test_read_value_200_is_raw_and_404_is_a_miss() -> None:
    assert parse_read_value(200, {}, b'{"success":false}') == b'{"success":false}'
    miss = _env(False, None, errors=[{"code": 10009, "message": "get: 'key not found'"}])
    assert parse_read_value(404, {}, miss) is None
    assert parse_read_value(404, {}, b"not json") is None
    with pytest.raises(KVError) as err:
        parse_read_value(
            404, {}, b'{"success":false,"errors":[{"code":10013,"message":"namespace not found"}]}'
        )
    assert err.value.codes == (10013,)


def test_envelope_parsing_is_lenient() -> None:
    assert parse_envelope(200, b"").success
    assert not parse_envelope(500, b"<html>").success
    env = parse_envelope(400, b'{"errors":[{"code":"x","message":1},"plain"],"result":{"a":1}}')
    assert not env.success and env.errors == ((0, "1"), (0, "plain")) and env.result == {"a": 1}


def test_status_classification() -> None:
    with pytest.raises(KVRateLimited) as limited:
        parse_list_keys(
            429, {"retry-after": "7"}, b'{"success":false,"errors":[{"code":10000,"message":"x"}]}'
        )
    assert limited.value.retry_after == 7.0
    with pytest.raises(KVError) as server:
        parse_bulk_get(502, {}, b"")
    assert server.value.retryable
    with pytest.raises(KVError) as client:
        parse_bulk_get(400, {}, b'{"success":false,"errors":[{"code":10001,"message":"bad"}]}')
    assert not client.value.retryable and "10001: bad" in str(client.value)


def test_retry_after_in_seconds_or_http_date() -> None:
    assert parse_retry_after({"retry-after": "3"}, 0) == 3.0
    assert parse_retry_after({"retry-after": "Thu, 01 Jan 1970 00:01:40 GMT"}, 40.0) == 60.0
    assert parse_retry_after({"retry-after": "soon"}, 0) is None
    assert parse_retry_after({}, 0) is None


def test_bulk_get_values_and_nulls() -> None:
    body = _env(True, {"values": {"a": '{"x":1}', "b": None, "c": {"value": "v", "metadata": None}}})
    assert parse_bulk_get(200, {}, body) == {"a": b'{"x":1}', "b": None, "c": b"v"}


def test_bulk_result_is_read_on_4xx_too() -> None:
    body = _env(True, {"successful_key_count": 1, "unsuccessful_keys": ["b"]})
    assert parse_bulk_result(400, {}, body, op="bulk_write").unsuccessful_keys == ("b",)
    with pytest.raises(KVError):
        parse_bulk_result(
            400, {}, b'{"success":false,"errors":[{"code":10001,"message":"x"}]}', op="bulk_write"
        )


@pytest.mark.parametrize("cursor", ["", None])
def test_list_ends_on_empty_or_missing_cursor(cursor: str | None) -> None:
    info = {"count": 0} if cursor is None else {"count": 0, "cursor": cursor}
    body = json.dumps(
        {"success": True, "errors": [], "messages": [], "result": [], "result_info": info}
    ).encode()
    assert parse_list_keys(200, {}, body).cursor is None


def test_an_empty_page_with_a_cursor_is_not_the_end() -> None:
    body = b'{"success":true,"errors":[],"messages":[],"result":[],"result_info":{"count":0,"cursor":"c2"}}'
    page = parse_list_keys(200, {}, body)
    assert page.names == () and page.cursor == "c2"
