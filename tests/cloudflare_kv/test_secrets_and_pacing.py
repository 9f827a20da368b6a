"""CloudflareKVTier: the token is checked at construction and kept off plain http; the write
pacing has no gap between the flusher taking a parked write and recording its send; redact_keys
reaches httpx's request log, events, logs and spans."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import pytest

from tiercache import ConfigurationError, TieredCache
from tiercache._serde import JsonCodec
from tiercache._tier import TierBinding
from tiercache.adapters.cloudflare_kv import CloudflareKVTier
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeCloudflareKV, make_entry

IDS = {"account_id": "0" * 32, "namespace_id": "f" * 32}


@pytest.mark.parametrize("token", ["tok\n", "  tok  ", "\ttok"])
def test_surrounding_whitespace_is_stripped_from_the_token(token: str) -> None:
    kv = FakeCloudflareKV(token="tok")
    tier = CloudflareKVTier(
        **IDS, api_token=token, base_url="https://kv.test/client/v4", transport=kv.transport()
    )
    tier.bind(TierBinding(namespace="t"))
    assert tier.get("t:k") is None  # the fake accepted the stripped token
    assert kv.records and all(r.status != 401 for r in kv.records)
    tier.close()


@pytest.mark.parametrize("token", ["tök", "to ken", "tok\x00en", "", "   ", "tok\u200b"])
def test_a_token_with_characters_a_header_cannot_carry_is_refused_without_showing_it(token: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        CloudflareKVTier(**IDS, api_token=token)
    assert (token.strip() or "@@") not in str(info.value)


def test_plain_http_is_refused_unless_loopback_or_allowed() -> None:
    with pytest.raises(ConfigurationError, match="plain http"):
        CloudflareKVTier(**IDS, api_token="t", base_url="http://kv.example.com/client/v4")
    CloudflareKVTier(**IDS, api_token="t", base_url="http://127.0.0.1:9/client/v4").close()
    CloudflareKVTier(**IDS, api_token="t", base_url="http://kv.internal/client/v4", allow_http=True).close()
    with pytest.raises(ConfigurationError):
        CloudflareKVTier(**IDS, api_token="t", base_url="ftp://kv.example.com/")


class RacingTier(CloudflareKVTier):
    """Another caller writes the same key at the exact moment the flusher takes a parked write."""

    race_key = ""
    race_entry: Any = None
    raced = threading.Event()

    def _flow_pending(self, op: Any) -> Any:
        if op.key == self.race_key and not self.raced.is_set():
            self.raced.set()
            self.set(self.race_key, self.race_entry)
        return super()._flow_pending(op)


def test_the_flusher_records_its_send_before_freeing_the_parked_slot() -> None:
    kv = FakeCloudflareKV(write_interval=1.0)
    clock = FakeClock()
    tier = RacingTier(
        **IDS, api_token=kv.token, base_url="https://kv.test/client/v4", transport=kv.transport()
    )
    tier.bind(TierBinding(clock=clock, codec=JsonCodec(), namespace="r"))
    k = "r:" + uuid.uuid4().hex
    tier.race_key = k
    tier.set(k, make_entry(k, 1, clock()))  # sent now
    tier.set(k, make_entry(k, 2, clock()))  # parked for the next window
    tier.race_entry = make_entry(k, 3, clock())  # the newest version
    assert tier.flush(5.0)
    assert RacingTier.raced.is_set()
    assert kv.stats.write_rate_violations == 0  # never two PUTs of the key within a second
    assert tier.stats.rate_limited == 0 and tier.stats.deferred_failures == 0
    assert tier.get(k) is not None and tier.get(k).value == 3  # type: ignore[union-attr]
    tier.close()


def test_redact_keys_reaches_httpx_logs_events_and_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    kv = FakeCloudflareKV()
    events: list[Any] = []
    cache = TieredCache([MemoryTier(), kv.tier()], namespace="red", redact_keys=True, on_event=events.append)
    secret = "user-4711@example.com"
    cache.sync.get_cached(secret, lambda: 1)
    kv.down = True
    cache.sync.delete(secret)
    cache.sync.get_cached(secret, lambda: 2)
    kv.down = False
    text = caplog.text + "".join(repr(e) for e in events)
    assert "HTTP Request" in caplog.text  # httpx did log the requests...
    assert secret not in text and "user-4711%40example.com" not in text  # ...without the key
    assert any(e.key.startswith("key#") for e in events)
