"""TieredCache over in-process and remote-like tiers: walk, back-fill, lifetimes, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from enum import Enum
from typing import Any

import pydantic
import pytest

from tiercache import (
    ConfigurationError,
    Event,
    EventKind,
    InvalidKeyError,
    SerializationError,
    TieredCache,
    ValueTooLargeError,
)
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def chain(clock: FakeClock, **kw: Any) -> tuple[TieredCache, MemoryTier, FakeRemoteTier]:
    l1, l2 = MemoryTier(max_entries=100), FakeRemoteTier()
    return TieredCache([l1, l2], clock=clock, namespace="t", **kw), l1, l2


def test_loader_result_is_written_to_every_tier_and_served_from_l1(clock: FakeClock) -> None:
    cache, l1, l2 = chain(clock, ttl=30)
    calls = []
    assert cache.sync.get_cached("k", lambda: calls.append(1) or "v") == "v"
    assert cache.sync.get_cached("k", lambda: calls.append(1) or "w") == "v"
    assert calls == [1]
    assert l2.calls["get"] == 1  # the second call never left L1
    assert l1.get("t:k") is not None and l2.get("t:k") is not None


def test_l2_hit_backfills_l1_with_the_remaining_lifetime_only(clock: FakeClock) -> None:
    cache, l1, _ = chain(clock, ttl=60)
    cache.sync.set("k", "v")
    l1.delete("t:k", 2**62)
    clock.advance(50)  # 10 s of freshness left
    assert cache.sync.get_cached("k", lambda: "loader") == "v"
    copy = l1.get("t:k")
    assert copy is not None and copy.fresh_until == pytest.approx(clock() + 10)
    clock.advance(11)
    assert l1.get("t:k") is None or not copy.fresh_until > clock()
    assert cache.sync.get_cached("k", lambda: "reloaded") == "reloaded"


def test_per_tier_max_ttl_caps_l1_but_not_l2(clock: FakeClock) -> None:
    l1, l2 = MemoryTier(max_ttl=5), FakeRemoteTier()
    cache = TieredCache([l1, l2], clock=clock, ttl=60)
    cache.sync.set("k", 1)
    clock.advance(6)
    assert l1.get("tc:k") is None
    assert cache.sync.get("k") == 1  # from L2, back-filled for 5 s more at most
    entry = l1.get("tc:k")
    assert entry is not None and entry.stale_until <= clock() + 5


def test_stale_entry_is_not_served_without_swr_or_failure(clock: FakeClock) -> None:
    cache, *_ = chain(clock, ttl=10, stale_ttl=100)
    cache.sync.set("k", "old")
    clock.advance(11)
    assert cache.sync.get("k") is None
    assert cache.sync.get("k", allow_stale=True) == "old"
    assert cache.sync.get_cached("k", lambda: "new") == "new"


def test_nothing_is_served_past_stale_until_even_if_the_tier_still_holds_it(clock: FakeClock) -> None:
    cache, _, l2 = chain(clock, ttl=10, stale_ttl=10)
    cache.sync.set("k", "old")
    data, _ = l2.store["t:k"]
    l2.store["t:k"] = (data, clock() + 10_000)  # a tier whose native TTL is too long (KV's 60 s)
    clock.advance(25)
    assert cache.sync.get("k", allow_stale=True) is None
    assert cache.sync.get_cached("k", lambda: "fresh") == "fresh"


def test_fail_safe_serves_stale_when_the_loader_fails(clock: FakeClock) -> None:
    cache, *_ = chain(clock, ttl=10, stale_ttl=100)
    cache.sync.set("k", "old")
    clock.advance(11)

    def broken() -> str:
        raise RuntimeError("db down")

    assert cache.sync.get_cached("k", broken) == "old"
    clock.advance(6)  # past the fail-safe throttle (5 s by default), still inside stale_ttl
    with pytest.raises(RuntimeError, match="db down"):
        cache.sync.get_cached("k", broken, fail_safe=False)


def test_delete_removes_from_every_tier(clock: FakeClock) -> None:
    cache, l1, l2 = chain(clock)
    cache.sync.set("k", 1)
    cache.sync.delete("k")
    assert l1.get("t:k") is None and l2.get("t:k") is None
    assert cache.sync.get("k", "gone") == "gone"


def test_none_is_a_cacheable_value(clock: FakeClock) -> None:
    cache, *_ = chain(clock)
    calls = []
    for _ in range(3):
        assert cache.sync.get_cached("k", lambda: calls.append(1)) is None
    assert calls == [1]
    cache.sync.delete("k")
    asyncio.run(cache.get_cached("k", lambda: None))
    assert asyncio.run(cache.get("k", "default")) is None


def test_loader_exception_is_not_cached(clock: FakeClock) -> None:
    cache, *_ = chain(clock)
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("first")
        return "ok"

    with pytest.raises(ValueError):
        cache.sync.get_cached("k", flaky)
    assert cache.sync.get_cached("k", flaky) == "ok"


# --- failures of tiers -----------------------------------------------------------------------


def test_tier_errors_degrade_to_a_miss_and_writes_are_skipped(clock: FakeClock) -> None:
    events: list[Event] = []
    cache, l1, l2 = chain(clock, on_event=events.append)
    l2.down = True
    assert cache.sync.get_cached("k", lambda: "v") == "v"  # read failed, write failed: no exception
    assert asyncio.run(cache.get_cached("k2", lambda: "w")) == "w"
    kinds = [e.kind for e in events if e.tier == "remote"]
    assert EventKind.TIER_ERROR in kinds
    assert l1.get("t:k") is not None  # L1 still caches


def test_breaker_opens_after_repeated_failures_and_closes_after_cooldown(clock: FakeClock) -> None:
    events: list[Event] = []
    cache, _, l2 = chain(clock, on_event=events.append, breaker_threshold=3, breaker_cooldown=2)
    l2.down = True
    for i in range(3):
        cache.sync.get(f"k{i}")
    assert any(e.kind == EventKind.BREAKER_OPEN for e in events)
    calls = l2.calls["get"]
    cache.sync.get("k9")
    assert l2.calls["get"] == calls  # skipped while open
    assert any(e.kind == EventKind.TIER_SKIPPED for e in events)
    l2.down = False
    clock.advance(2.1)
    cache.sync.get("k10")
    assert l2.calls["get"] == calls + 1
    assert any(e.kind == EventKind.BREAKER_CLOSED for e in events)


def test_corrupt_or_foreign_bytes_are_a_counted_miss(clock: FakeClock) -> None:
    events: list[Event] = []
    cache, _, l2 = chain(clock, on_event=events.append)
    l2.put_raw("t:k", b"\x80garbage")
    l2.put_raw("t:j", b'{"tc":1,"k":"t:other","v":1,"c":0,"f":9e12,"s":9e12,"t":[],"n":1}')
    assert cache.sync.get_cached("k", lambda: "loaded") == "loaded"
    assert cache.sync.get_cached("j", lambda: "loaded") == "loaded"
    assert sum(e.kind in (EventKind.CORRUPT, EventKind.TIER_ERROR) for e in events) >= 2


def test_a_raising_event_hook_never_breaks_a_request(clock: FakeClock) -> None:
    def hook(event: Event) -> None:
        raise RuntimeError("bad hook")

    cache, *_ = chain(clock, on_event=hook)
    assert cache.sync.get_cached("k", lambda: 1) == 1


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", 42, None, b"bytes", "x" * 10_000])
def test_bad_keys_raise_invalid_key_error(clock: FakeClock, key: Any) -> None:
    cache, *_ = chain(clock)
    with pytest.raises(InvalidKeyError):
        cache.sync.get_cached(key, lambda: 1)
    with pytest.raises(ValueError):  # InvalidKeyError is a ValueError too
        asyncio.run(cache.set(key, 1))


def test_unserialisable_value_raises_at_set_and_leaves_the_cache_untouched(clock: FakeClock) -> None:
    cache, l1, l2 = chain(clock)
    cache.sync.set("k", "before")

    class Opaque:
        pass

    with pytest.raises(SerializationError) as info:
        cache.sync.set("k", Opaque())
    assert isinstance(info.value, TypeError)
    assert "Opaque" in str(info.value)
    assert cache.sync.get("k") == "before"
    with pytest.raises(TypeError):
        cache.sync.get_cached("other", Opaque)
    assert l1.get("t:other") is None and "t:other" not in l2.store


def test_value_too_large_for_every_tier_is_refused(clock: FakeClock) -> None:
    l1 = MemoryTier(max_value_bytes=1000)
    l2 = FakeRemoteTier(max_value_bytes=1000)
    cache = TieredCache([l1, l2], clock=clock)
    with pytest.raises(ValueTooLargeError):
        cache.sync.set("big", "x" * 5000)
    assert l1.get("tc:big") is None and "tc:big" not in l2.store
    cache.sync.set("small", "x" * 10)
    assert cache.sync.get("small") == "x" * 10


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ConfigurationError):
        TieredCache([])
    with pytest.raises(ConfigurationError):
        TieredCache([MemoryTier()], ttl=0)
    with pytest.raises(ConfigurationError):
        TieredCache([MemoryTier()], namespace="a:b")
    tier = MemoryTier()
    with pytest.raises(ConfigurationError):
        TieredCache([tier, tier])
    with pytest.raises(ConfigurationError):
        TieredCache([object()])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError):
        TieredCache([MemoryTier()]).sync.set("k", 1, tags="users")


def test_async_loader_in_the_sync_api_is_a_clear_error(clock: FakeClock) -> None:
    cache, *_ = chain(clock)

    async def load() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="async API"):
        cache.sync.get_cached("k", load)


# --- type-faithful values through a remote tier --------------------------------------------------


class Color(Enum):
    RED = "red"


@dataclasses.dataclass
class Address:
    city: str
    since: dt.date


@dataclasses.dataclass
class User:
    id: uuid.UUID
    name: str
    balance: Decimal
    seen: dt.datetime
    color: Color
    addresses: list[Address]
    nick: str | None = None


class Order(pydantic.BaseModel):
    id: int
    total: Decimal
    at: dt.datetime


SAMPLES: list[tuple[Any, Any]] = [
    (
        User,
        User(
            uuid.uuid4(),
            "Ada",
            Decimal("10.25"),
            dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
            Color.RED,
            [Address("Paris", dt.date(2020, 5, 1))],
        ),
    ),
    (Order, Order(id=1, total=Decimal("9.99"), at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))),
    (dt.datetime, dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)),
    (uuid.UUID, uuid.uuid4()),
    (Decimal, Decimal("3.14159265358979323846")),
    (dict[str, list[Decimal]], {"a": [Decimal("1.1")]}),
    (tuple[int, str], (1, "x")),
    (set[int], {1, 2, 3}),
    (bytes, b"\x00\xff"),
    (User | None, None),
]


@pytest.mark.parametrize(("tp", "value"), SAMPLES, ids=[str(t) for t, _ in SAMPLES])
def test_values_come_back_from_the_remote_tier_as_their_type(clock: FakeClock, tp: Any, value: Any) -> None:
    remote = FakeRemoteTier()
    cache = TieredCache([MemoryTier(), remote], clock=clock)
    cache.sync.set("k", value, value_type=tp)
    other_process = TieredCache([MemoryTier(), FakeRemoteTier(remote.store)], clock=clock)
    got = other_process.sync.get_cached("k", lambda: pytest.fail("should hit L2"), value_type=tp)
    assert got == value and type(got) is type(value)


def test_decorator_uses_the_return_annotation_as_value_type(clock: FakeClock) -> None:
    from tiercache import tiered_cache

    remote = FakeRemoteTier()
    producer = TieredCache([MemoryTier(), remote], clock=clock)
    consumer = TieredCache([MemoryTier(), FakeRemoteTier(remote.store)], clock=clock)
    user = SAMPLES[0][1]

    @tiered_cache(producer, key="user:{uid}")
    def load(uid: int) -> User:
        return user

    @tiered_cache(consumer, key="user:{uid}")
    async def read(uid: int) -> User:
        raise AssertionError("should come from L2")

    load(1)
    got = asyncio.run(read(1))
    assert isinstance(got, User) and got == user


def test_a_tier_that_says_retry_after_is_skipped_for_exactly_that_long(clock: FakeClock) -> None:
    from tiercache import TierError

    class RateLimited(TierError):
        retry_after = 30.0

    cache, _, l2 = chain(clock, breaker_threshold=5, breaker_cooldown=1)
    l2.down = True
    original = l2._call

    def limited(op: str) -> None:
        if l2.down:
            l2.calls[op] += 1
            raise RateLimited("remote", "429")
        original(op)

    l2._call = limited  # type: ignore[method-assign]
    cache.sync.get("a")  # one 429 opens the breaker at once, for Retry-After seconds
    l2.down = False
    calls = l2.calls["get"]
    clock.advance(29)
    cache.sync.get("b")
    assert l2.calls["get"] == calls
    clock.advance(2)
    cache.sync.get("c")
    assert l2.calls["get"] == calls + 1


def test_redact_keys_keeps_keys_out_of_logs(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="tiercache")
    cache, _, l2 = chain(clock, redact_keys=True)
    l2.down = True
    cache.sync.get_cached("user:ada@example.com", lambda: 1)
    assert "ada@example.com" not in caplog.text
    assert "key#" in caplog.text
