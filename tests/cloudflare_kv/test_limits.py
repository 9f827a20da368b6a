"""CloudflareKVTier keeps to KV's limits: budget, Retry-After, retries, pacing, sizes, TTL floor, secrecy."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections.abc import Iterator

import pytest

from tests.cloudflare_kv.conftest import tier_factory
from tests.kv_fake import ACCOUNT_ID, NAMESPACE_ID, TOKEN, FakeKV, RetryAfterWitness
from tiercache._entry import next_version
from tiercache._errors import ConfigurationError, TierError, ValueTooLargeError
from tiercache._events import Event
from tiercache._serde import JsonCodec
from tiercache._tier import TierBinding
from tiercache.adapters._kv_protocol import MAX_VALUE_BYTES, KVRateLimited, kv_key_for
from tiercache.adapters.cloudflare_kv import CloudflareKVTier
from tiercache.testing import FakeClock, make_entry


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def own_fake() -> Iterator[FakeKV]:
    """A fresh fake per test, for tests that inject faults or spend budget."""
    with FakeKV() as fake:
        yield fake
    assert fake.violations == []
    assert fake.stats.write_rate_violations == 0
    assert fake.stats.retry_after_violations == 0


def bound(tier: CloudflareKVTier, clock: FakeClock, events: list[Event] | None = None) -> CloudflareKVTier:
    hook = events.append if events is not None else (lambda e: None)
    tier.bind(TierBinding(clock=clock, codec=JsonCodec(), namespace="lim", on_event=hook))
    return tier


def key() -> str:
    return f"lim:{uuid.uuid4().hex}"


# --- budget -------------------------------------------------------------------------------------


def test_spent_budget_skips_the_tier_at_once_without_a_request(own_fake: FakeKV, clock: FakeClock) -> None:
    mono = FakeClock(1000.0)
    tier = bound(tier_factory(own_fake, budget=5, budget_window=300, monotonic=mono)(), clock)
    for _ in range(5):
        assert tier.get(key()) is None
    seen = own_fake.stats.requests
    start = time.perf_counter()
    with pytest.raises(KVRateLimited, match="budget"):
        tier.get(key())
    assert time.perf_counter() - start < 0.05  # never waits
    assert own_fake.stats.requests == seen == 5
    assert tier.budget_used == 5 and tier.stats.skipped_budget == 1
    mono.advance(301)  # the window slid past the first five
    assert tier.get(key()) is None
    tier.close()


def test_budget_window_slides(own_fake: FakeKV, clock: FakeClock) -> None:
    mono = FakeClock(0.0)
    tier = bound(tier_factory(own_fake, budget=3, budget_window=10, monotonic=mono)(), clock)
    tier.get(key())
    mono.advance(6)
    tier.get(key())
    tier.get(key())
    with pytest.raises(KVRateLimited):
        tier.get(key())
    mono.advance(4.5)  # the first request left the window; the other two did not
    tier.get(key())
    with pytest.raises(KVRateLimited):
        tier.get(key())
    tier.close()


# --- 429, 5xx, timeouts -------------------------------------------------------------------------


def test_429_retry_after_is_obeyed(own_fake: FakeKV, clock: FakeClock) -> None:
    tier = bound(tier_factory(own_fake)(), clock)
    own_fake.faults, own_fake.fault_retry_after = ("429",), 1
    own_fake.set_faults(1.0)
    with pytest.raises(KVRateLimited) as first:
        tier.get(key())
    assert first.value.status == 429 and own_fake.stats.requests == 1
    own_fake.set_faults(0.0)
    with pytest.raises(KVRateLimited, match="wait"):
        tier.get(key())  # skipped locally: no request while Retry-After runs
    assert own_fake.stats.requests == 1 and tier.stats.rate_limited == 1
    time.sleep(1.05)
    assert tier.get(key()) is None
    assert own_fake.stats.requests == 2 and own_fake.stats.retry_after_violations == 0
    tier.close()


def test_the_retry_after_witness_catches_a_tier_that_ignores_429(
    own_fake: FakeKV, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client-side witness the fault runs rely on fails when the tier sends during a block."""
    witness = RetryAfterWitness()
    tier = bound(
        tier_factory(own_fake, transport=witness.transport(), async_transport=witness.async_transport())(),
        clock,
    )
    own_fake.faults, own_fake.fault_retry_after = ("429",), 1
    own_fake.set_faults(1.0)
    with pytest.raises(KVRateLimited):
        tier.get(key())
    own_fake.set_faults(0.0)
    time.sleep(0.3)
    with pytest.raises(KVRateLimited):
        tier.get(key())  # obeyed: skipped locally
    assert witness.violations(slack=0.1) == [] and len(witness.exchanges) == 1
    monkeypatch.setattr(tier, "_blocked_until", 0.0)  # a tier that forgot the 429
    with pytest.raises(KVRateLimited):
        tier.get(key())  # sent; the fake answers 429 again (arrived during its block)
    assert len(witness.violations(slack=0.1)) == 1
    own_fake.stats.retry_after_violations = 0  # this test caused it on purpose
    tier.close()


def test_5xx_is_retried_with_a_bound_then_raised(own_fake: FakeKV, clock: FakeClock) -> None:
    tier = bound(tier_factory(own_fake, retries=2, backoff=0.01)(), clock)
    own_fake.faults = ("500",)
    own_fake.set_faults(1.0)
    with pytest.raises(TierError, match="gave up after 3 attempt"):
        tier.get(key())
    assert own_fake.stats.requests == 3 and tier.stats.retries == 2
    own_fake.set_faults(0.0)
    tier.close()


def test_a_hanging_server_times_out_within_the_deadline(own_fake: FakeKV, clock: FakeClock) -> None:
    tier = bound(tier_factory(own_fake, timeout=0.1, deadline=0.35, backoff=0.01)(), clock)
    own_fake.faults, own_fake.timeout_delay = ("timeout",), 0.5
    own_fake.set_faults(1.0)
    start = time.perf_counter()
    with pytest.raises(TierError, match="Timeout"):
        tier.get(key())
    assert time.perf_counter() - start < 0.6
    own_fake.set_faults(0.0)
    tier.close()


def test_async_face_raises_promptly_too(own_fake: FakeKV, clock: FakeClock) -> None:
    tier = bound(tier_factory(own_fake, timeout=0.1, deadline=0.3, backoff=0.01)(), clock)
    own_fake.faults, own_fake.timeout_delay = ("timeout",), 0.5
    own_fake.set_faults(1.0)

    async def scenario() -> None:
        with pytest.raises(TierError):
            await tier.aget(key())
        await tier.aclose()

    start = time.perf_counter()
    asyncio.run(scenario())
    assert time.perf_counter() - start < 0.6
    own_fake.set_faults(0.0)
    tier.close()


# --- one write per key per second ------------------------------------------------------------


def test_rapid_writes_to_one_key_are_coalesced_and_paced(fake: FakeKV, clock: FakeClock) -> None:
    tier = bound(tier_factory(fake)(), clock)
    k = key()
    entries = [make_entry(k, i, clock()) for i in range(5)]
    for e in entries:
        tier.set(k, e)
    assert tier.get(k) == entries[-1]  # this process reads its own parked write
    assert fake.live_value(kv_key_for(k)) == JsonCodec().dumps(entries[0])  # not sent yet
    assert tier.stats.deferred_writes == 4 and tier.stats.coalesced_writes == 3
    assert tier.flush(3.0)
    assert fake.live_value(kv_key_for(k)) == JsonCodec().dumps(entries[-1])
    puts = [r for r in fake.records if r.keys == (kv_key_for(k),) and r.method == "PUT"]
    assert len(puts) == 2 and puts[1].t - puts[0].t >= 1.0
    tier.close()


def test_delete_right_after_a_write_is_paced_and_visible_locally(fake: FakeKV, clock: FakeClock) -> None:
    tier = bound(tier_factory(fake)(), clock)
    k = key()
    tier.set(k, make_entry(k, "v", clock()))
    tier.delete(k, next_version())
    assert tier.get(k) is None
    tier.close()  # sends the parked delete
    assert fake.live_value(kv_key_for(k)) is None


def test_a_backfill_of_the_version_just_written_is_dropped(fake: FakeKV, clock: FakeClock) -> None:
    tier = bound(tier_factory(fake)(), clock)
    k = key()
    e = make_entry(k, "v", clock())
    tier.set(k, e)
    tier.set(k, e)
    tier.set_many([(k, e)])
    assert tier.stats.dropped_backfills == 2 and tier.stats.deferred_writes == 0
    tier.close()


# --- sizes and lifetimes ----------------------------------------------------------------------


def test_values_over_the_limit_are_refused_before_any_request(fake: FakeKV, clock: FakeClock) -> None:
    tier = bound(tier_factory(fake, max_value_bytes=1000)(), clock)
    seen = fake.stats.requests
    with pytest.raises(ValueTooLargeError):
        tier.set(key(), make_entry("x", "y" * 2000, clock()))
    default = bound(tier_factory(fake)(), clock)
    assert default.max_value_bytes == MAX_VALUE_BYTES
    with pytest.raises(ValueTooLargeError):
        default.set_many([(key(), make_entry("x", "y" * MAX_VALUE_BYTES, clock()))])
    assert fake.stats.requests == seen
    tier.close()
    default.close()


def test_short_lives_are_exact_despite_the_60s_floor(fake: FakeKV, clock: FakeClock) -> None:
    tier = bound(tier_factory(fake)(), clock)
    k = key()
    tier.set(k, make_entry(k, "v", clock(), ttl=5))
    item = fake.store[kv_key_for(k)]
    assert item.expires is not None and 59 <= item.expires - time.time() <= 61
    clock.advance(4)
    assert tier.get(k) is not None
    clock.advance(2)
    assert tier.get(k) is None  # KV still holds it; the entry's own stale_until decides
    assert fake.live_value(kv_key_for(k)) is not None
    tier.close()


# --- keys, listing, clearing ------------------------------------------------------------------


def test_kv_names_stay_readable_where_kv_allows(fake: FakeKV, clock: FakeClock) -> None:
    tier = bound(tier_factory(fake)(), clock)
    base = key()
    for suffix in ("a/b", "ключ/🔑", "q?x=1#f%"):
        k = f"{base}:{suffix}"
        tier.set(k, make_entry(k, suffix, clock()))
        assert k in fake.store and tier.get(k) is not None
    spaced = f"{base}:with space"
    tier.set(spaced, make_entry(spaced, 1, clock()))
    assert spaced not in fake.store and kv_key_for(spaced) in fake.store
    assert kv_key_for(spaced).startswith(f"{base}:with#h:")
    tier.close()


def test_listing_pages_through_empty_pages_and_clear_keeps_other_namespaces(clock: FakeClock) -> None:
    with FakeKV(empty_list_pages=True) as fake:
        tier = bound(tier_factory(fake)(), clock)
        mine = [(f"lim:k{i:02d}", make_entry(f"lim:k{i:02d}", i, clock())) for i in range(25)]
        tier.set_many(mine)
        other = make_entry("other:k", 1, clock())
        tier.set("other:k", other)
        assert tier.list_keys("lim:", page_size=10) == [k for k, _ in mine]
        lists = [r for r in fake.records if r.route == "/keys"]
        assert len(lists) == 6  # an empty page (with a cursor) before each of 10, 10 and 5 names
        assert tier.clear() == 25  # the bound namespace "lim:"
        assert tier.list_keys("lim:") == [] and tier.get("other:k") == other
        assert [r.route for r in fake.records if r.method == "POST"] == ["/bulk/delete"]
        tier.close()
        assert fake.violations == [] and fake.stats.write_rate_violations == 0


# --- the token ------------------------------------------------------------------------------


def test_token_never_appears_in_repr_logs_events_or_errors(
    own_fake: FakeKV, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    events: list[Event] = []
    tier = bound(tier_factory(own_fake, timeout=0.1, deadline=0.3, backoff=0.01)(), clock, events)
    texts = [repr(tier), str(tier), repr(vars(tier))]
    k = key()
    tier.set(k, make_entry(k, 1, clock()))
    tier.set(k, make_entry(k, 2, clock()))  # parked; fails when sent, as the token is revoked
    own_fake.token = "rotated"
    assert tier.flush(3.0)
    own_fake.token = TOKEN
    assert tier.stats.deferred_failures == 1 and events
    own_fake.timeout_delay = 0.3
    for kind in ("500", "timeout", "429"):  # 429 last: it blocks the tier
        own_fake.faults = (kind,)
        own_fake.set_faults(1.0)
        with pytest.raises(TierError) as err:
            tier.get(key())
        texts.append("".join(traceback.format_exception(err.value)))
        texts.append(repr(err.value.__cause__))
    own_fake.set_faults(0.0)
    tier.close()
    texts += [repr(e) for e in events] + [str(e.error) for e in events]
    texts.append(caplog.text)
    assert all(TOKEN not in t for t in texts)
    assert "Bearer" not in caplog.text


def test_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, fake: FakeKV) -> None:
    monkeypatch.delenv("CLOUDFLARE_API_TOKEN", raising=False)
    with pytest.raises(ConfigurationError, match="CLOUDFLARE_API_TOKEN"):
        CloudflareKVTier(account_id=ACCOUNT_ID, namespace_id=NAMESPACE_ID, base_url=fake.base_url)
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", TOKEN)
    tier = CloudflareKVTier(account_id=ACCOUNT_ID, namespace_id=NAMESPACE_ID, base_url=fake.base_url)
    assert tier.get(key()) is None
    tier.close()


def test_capabilities() -> None:
    tier = CloudflareKVTier(account_id="a", namespace_id="n", api_token="t")
    assert (tier.name, tier.in_process, tier.shared, tier.max_ttl) == ("kv", False, True, None)
    assert not getattr(tier, "offers_lease", False)
    assert not hasattr(tier, "acquire_lease")
