"""Cross-check with Cloudflare's official Python SDK (``cloudflare``) on the same fake server.

What the tier writes, the SDK reads back byte for byte, and what the SDK writes (single, bulk),
the tier reads back, including keys with ``/``, spaces and non-ASCII. The fake validates the
SDK's requests against the same OpenAPI description, so it is checked from both sides.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import cloudflare  # the official SDK (a dev dependency: the cross-check never skips)
import pytest

from tests.cloudflare_kv.conftest import tier_factory
from tests.kv_fake import ACCOUNT_ID, NAMESPACE_ID, TOKEN, FakeKV
from tiercache._serde import JsonCodec
from tiercache._tier import TierBinding
from tiercache.adapters._kv_protocol import kv_key_for
from tiercache.adapters.cloudflare_kv import CloudflareKVTier
from tiercache.testing import FakeClock, make_entry

IDS = {"account_id": ACCOUNT_ID, "namespace_id": NAMESPACE_ID}
SUFFIXES = ["plain", "a/b/c", "ключ/键/🔑", "with space", "q?x=1#frag%", "."]


@pytest.fixture
def sdk(fake: FakeKV) -> Iterator[cloudflare.Cloudflare]:
    client = cloudflare.Cloudflare(api_token=TOKEN, base_url=fake.base_url, max_retries=0)
    yield client
    client.close()


@pytest.fixture
def tier(fake: FakeKV) -> Iterator[CloudflareKVTier]:
    clock = FakeClock()
    tier = tier_factory(fake)()
    tier.bind(TierBinding(clock=clock, codec=JsonCodec(), namespace="x"))
    yield tier
    tier.close()


def _key(suffix: str) -> str:
    return f"x:{uuid.uuid4().hex}:{suffix}"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_sdk_reads_what_the_tier_wrote(
    tier: CloudflareKVTier, sdk: cloudflare.Cloudflare, suffix: str
) -> None:
    k = _key(suffix)
    entry = make_entry(k, {"v": suffix, "n": [1, 2.5]}, FakeClock()(), tags=("t",))
    tier.set(k, entry)
    got = sdk.kv.namespaces.values.get(kv_key_for(k), **IDS).read()
    assert got == JsonCodec().dumps(entry)
    bulk = sdk.kv.namespaces.bulk_get(NAMESPACE_ID, account_id=ACCOUNT_ID, keys=[kv_key_for(k)])
    assert bulk is not None and bulk.values is not None
    assert bulk.values[kv_key_for(k)] == got.decode("utf-8")  # type: ignore[index]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tier_reads_what_the_sdk_wrote(
    tier: CloudflareKVTier, sdk: cloudflare.Cloudflare, suffix: str
) -> None:
    k = _key(suffix)
    entry = make_entry(k, ["from", "sdk", suffix], FakeClock()(), ttl=300, version=42)
    payload = JsonCodec().dumps(entry)
    sdk.kv.namespaces.values.update(
        kv_key_for(k), value=payload, expiration_ttl=120, metadata={"tc": 1}, **IDS
    )
    got = tier.get(k)
    assert got is not None and got.value == entry.value and got.version == 42
    assert got.stale_until == entry.stale_until


def test_sdk_bulk_write_is_read_by_the_tier_in_one_bulk_get(
    fake: FakeKV, tier: CloudflareKVTier, sdk: cloudflare.Cloudflare
) -> None:
    now = FakeClock()()
    keys = [_key(s) for s in SUFFIXES]
    entries = [make_entry(k, i, now) for i, k in enumerate(keys)]
    body = [
        {"key": kv_key_for(e.key), "value": JsonCodec().dumps(e).decode(), "expiration_ttl": 120}
        for e in entries
    ]
    sdk.kv.namespaces.bulk_update(NAMESPACE_ID, account_id=ACCOUNT_ID, body=body)  # type: ignore[arg-type]
    before = len(fake.records)
    got = tier.get_many([*keys, _key("missing")])
    assert [g.value if g else None for g in got] == [*range(len(keys)), None]
    assert [r.route for r in fake.records[before:]] == ["/bulk/get"]


def test_sdk_delete_and_list_see_the_tier_keys(tier: CloudflareKVTier, sdk: cloudflare.Cloudflare) -> None:
    prefix = f"x:{uuid.uuid4().hex}:"
    keys = [prefix + s for s in SUFFIXES]
    tier.set_many([(k, make_entry(k, 1, FakeClock()())) for k in keys])
    listed = [
        item.name for item in sdk.kv.namespaces.keys.list(NAMESPACE_ID, account_id=ACCOUNT_ID, prefix=prefix)
    ]
    assert sorted(listed) == sorted(kv_key_for(k) for k in keys)
    assert tier.list_keys(prefix) == sorted(listed, key=lambda n: n.encode())
    time.sleep(1.05)  # the SDK is another writer: it too may write a key once per second
    sdk.kv.namespaces.values.delete(kv_key_for(keys[1]), **IDS)
    assert tier.get(keys[1]) is None and tier.get(keys[0]) is not None
