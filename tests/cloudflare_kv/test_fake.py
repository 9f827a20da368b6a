"""The fake itself: it fails loudly without the OpenAPI file and catches traffic that breaks the contract."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.kv_fake import ACCOUNT_ID, NAMESPACE_ID, TOKEN, FakeKV
from tests.kv_fake.spec import load_spec


def test_missing_openapi_file_is_an_error_not_a_skip(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="OpenAPI"):
        load_spec(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("method", "suffix", "params", "headers", "body", "problem"),
    [
        (
            "PUT",
            "/values/k",
            {"expiration_ttl": "59"},
            {"Content-Type": "application/octet-stream"},
            b"v",
            "minimum",
        ),
        ("PUT", "/values/k", {}, {"Content-Type": "text/plain"}, b"v", "content"),
        ("POST", "/bulk/get", {}, {"Content-Type": "application/json"}, b'{"type":"text"}', "keys"),
        ("GET", "/keys", {"limit": "5"}, {}, b"", "minimum"),
    ],
)
def test_requests_that_break_the_description_are_caught(
    method: str, suffix: str, params: dict[str, str], headers: dict[str, str], body: bytes, problem: str
) -> None:
    with FakeKV() as fake:
        url = f"{fake.base_url}/accounts/{ACCOUNT_ID}/storage/kv/namespaces/{NAMESPACE_ID}{suffix}"
        resp = httpx.request(
            method, url, params=params, headers={"Authorization": f"Bearer {TOKEN}", **headers}, content=body
        )
        assert resp.status_code == 400
        assert len(fake.violations) == 1 and problem in fake.violations[0].lower()


def test_unauthenticated_requests_are_caught() -> None:
    with FakeKV() as fake:
        url = f"{fake.base_url}/accounts/{ACCOUNT_ID}/storage/kv/namespaces/{NAMESPACE_ID}/values/k"
        assert httpx.get(url).status_code == 400
        assert "security" in fake.violations[0].lower()
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 403


def test_second_write_within_a_second_is_rate_limited() -> None:
    with FakeKV() as fake:
        url = f"{fake.base_url}/accounts/{ACCOUNT_ID}/storage/kv/namespaces/{NAMESPACE_ID}/values/k"
        h = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
        assert httpx.put(url, params={"expiration_ttl": "60"}, headers=h, content=b"1").status_code == 200
        second = httpx.put(url, params={"expiration_ttl": "60"}, headers=h, content=b"2")
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert fake.stats.write_rate_violations == 1 and fake.violations == []
