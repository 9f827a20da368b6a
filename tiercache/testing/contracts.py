"""The contracts every tier (and every lease tier) must pass, as pytest test classes.

Use one by subclassing it in your tests and providing a ``make_tier`` fixture::

    from tiercache.testing import TierContract

    class TestMyTier(TierContract):
        @pytest.fixture
        def make_tier(self):
            return lambda: MyTier(...)

This module imports pytest (``tiercache.testing`` loads it only when a contract is asked for).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from .._entry import Entry, next_version
from .._serde import JsonCodec
from .._tier import ExtendableLease, LeaseTier, Tier, TierBinding
from .clock import FakeClock
from .fakes import make_entry

__all__ = ["LeaseContract", "TierContract"]


def _same(a: Entry | None, b: Entry, max_ttl: float | None = None) -> bool:
    """``a`` is ``b`` as a tier returns it: equal, or clamped to the tier's ``max_ttl``."""
    if a is None:
        return False
    stale_until = b.stale_until
    if max_ttl is not None and a.stale_until < stale_until:
        stale_until = a.stale_until  # clamped: allowed only down to created + max_ttl (checked below)
        if stale_until < min(b.stale_until, b.created_at + max_ttl) - 1:
            return False
    return (
        a.key == b.key
        and a.value == b.value
        and abs(a.created_at - b.created_at) < 1e-6
        and abs(a.fresh_until - min(b.fresh_until, stale_until)) < 1e-6
        and abs(a.stale_until - stale_until) < 1e-6
        and tuple(a.tags) == tuple(b.tags)
        and a.version == b.version
    )


class TierContract:
    """The behaviour every tier promises the core. Subclass and provide ``make_tier``.

    ``make_tier`` is a fixture returning a zero-argument factory; each call gives a tier that
    shares storage with the others it made (like two processes on one Redis), or a fresh one for
    in-process tiers. Keys are unique per test so a shared server needs no flushing.
    """

    #: Set False for tiers whose storage is not shared between instances (in-process tiers).
    shared_storage = False
    #: Set True for tiers that keep a tombstone after ``delete`` (refusing older late writes).
    keeps_tombstones = False

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def tier(self, make_tier: Callable[[], Tier], clock: FakeClock) -> Any:
        tier = make_tier()
        tier.bind(TierBinding(clock=clock, codec=JsonCodec(), namespace="contract"))
        yield tier
        tier.close()

    @pytest.fixture
    def key(self) -> str:
        return f"contract:{uuid.uuid4().hex}"

    # --- get / set ------------------------------------------------------------------------

    def test_missing_key_is_none(self, tier: Tier, key: str) -> None:
        assert tier.get(key) is None

    def test_set_then_get_round_trips_value_times_tags_version(
        self, tier: Tier, key: str, clock: FakeClock
    ) -> None:
        entry = make_entry(key, {"name": "Ada", "n": [1, 2.5, None, True]}, clock(), tags=("users", "x"))
        tier.set(key, entry)
        assert _same(tier.get(key), entry, tier.max_ttl)

    @pytest.mark.parametrize("value", [None, 0, "", [], {}, "ünïcødé ✓", 2**53, -1.5])
    def test_falsy_and_edge_values_are_cacheable(
        self, tier: Tier, key: str, clock: FakeClock, value: Any
    ) -> None:
        entry = make_entry(key, value, clock())
        tier.set(key, entry)
        got = tier.get(key)
        assert got is not None and got.value == value

    @pytest.mark.parametrize(
        "suffix", ["a/b/c", "with space", "q?x=1#frag", "100%", "ключ/键/🔑", ".", "..", "\t\n"]
    )
    def test_awkward_keys_round_trip(self, tier: Tier, key: str, clock: FakeClock, suffix: str) -> None:
        k = f"{key}:{suffix}"
        entry = make_entry(k, suffix, clock())
        tier.set(k, entry)
        assert _same(tier.get(k), entry, tier.max_ttl)
        tier.delete(k, next_version())
        assert tier.get(k) is None

    def test_very_long_key_round_trips(self, tier: Tier, key: str, clock: FakeClock) -> None:
        k = key + ":" + "x" * 2000
        entry = make_entry(k, 1, clock())
        tier.set(k, entry)
        assert _same(tier.get(k), entry, tier.max_ttl)
        assert tier.get(key + ":" + "x" * 1999 + "y") is None

    def test_newer_version_replaces_older(self, tier: Tier, key: str, clock: FakeClock) -> None:
        first = make_entry(key, "one", clock())
        second = make_entry(key, "two", clock())
        tier.set(key, first)
        tier.set(key, second)
        assert _same(tier.get(key), second, tier.max_ttl)

    def test_older_version_never_replaces_newer(self, tier: Tier, key: str, clock: FakeClock) -> None:
        older = make_entry(key, "late", clock())
        newer = make_entry(key, "new", clock())
        tier.set(key, newer)
        tier.set(key, older)
        assert _same(tier.get(key), newer, tier.max_ttl)

    def test_keys_are_independent(self, tier: Tier, key: str, clock: FakeClock) -> None:
        a, b = make_entry(key + ":a", "A", clock()), make_entry(key + ":b", "B", clock())
        tier.set(a.key, a)
        tier.set(b.key, b)
        tier.delete(a.key, next_version())
        assert tier.get(a.key) is None
        assert _same(tier.get(b.key), b, tier.max_ttl)

    # --- time -----------------------------------------------------------------------------

    def test_entry_is_served_while_stale_and_gone_after_hard_expiry(
        self, tier: Tier, key: str, clock: FakeClock
    ) -> None:
        if tier.max_ttl is not None and tier.max_ttl < 120:
            pytest.skip("not applicable: tier keeps nothing that long")
        entry = make_entry(key, "v", clock(), ttl=60, stale_ttl=60)
        tier.set(key, entry)
        clock.advance(90)  # stale, not dead: the tier still returns it; the core decides
        assert _same(tier.get(key), entry, tier.max_ttl)
        clock.advance(31)  # past stale_until
        assert tier.get(key) is None

    def test_already_dead_entry_is_not_stored(self, tier: Tier, key: str, clock: FakeClock) -> None:
        entry = make_entry(key, "v", clock() - 120, ttl=60)
        tier.set(key, entry)
        assert tier.get(key) is None

    def test_max_ttl_caps_the_stored_lifetime(self, tier: Tier, key: str, clock: FakeClock) -> None:
        if tier.max_ttl is None:
            pytest.skip("not applicable: tier has no max_ttl")
        entry = make_entry(key, "v", clock(), ttl=tier.max_ttl * 10)
        tier.set(key, entry)
        clock.advance(tier.max_ttl + 1)
        assert tier.get(key) is None

    # --- delete ---------------------------------------------------------------------------

    def test_delete_removes(self, tier: Tier, key: str, clock: FakeClock) -> None:
        tier.set(key, make_entry(key, "v", clock()))
        tier.delete(key, next_version())
        assert tier.get(key) is None

    def test_delete_of_missing_key_is_harmless(self, tier: Tier, key: str) -> None:
        tier.delete(key, next_version())
        assert tier.get(key) is None

    def test_delete_does_not_remove_a_newer_write(self, tier: Tier, key: str, clock: FakeClock) -> None:
        delete_version = next_version()
        newer = make_entry(key, "newer", clock())
        tier.set(key, newer)
        tier.delete(key, delete_version)
        assert _same(tier.get(key), newer, tier.max_ttl)

    def test_tombstone_refuses_a_late_older_write(self, tier: Tier, key: str, clock: FakeClock) -> None:
        if not self.keeps_tombstones:
            pytest.skip("not applicable: tier keeps no tombstones")
        late = make_entry(key, "late", clock())
        tier.delete(key, next_version())
        tier.set(key, late)
        assert tier.get(key) is None

    # --- batches --------------------------------------------------------------------------

    def test_get_many_keeps_order_and_reports_misses(self, tier: Tier, key: str, clock: FakeClock) -> None:
        entries = [make_entry(f"{key}:{i}", i, clock()) for i in range(5)]
        tier.set_many([(e.key, e) for e in entries[:3]])
        got = tier.get_many([e.key for e in reversed(entries)])
        assert got[0] is None and got[1] is None
        assert [g.value if g else None for g in got[2:]] == [2, 1, 0]

    def test_get_many_of_nothing(self, tier: Tier) -> None:
        assert tier.get_many([]) == []

    # --- sharing and the async face ---------------------------------------------------------

    def test_second_instance_sees_writes_when_storage_is_shared(
        self, make_tier: Callable[[], Tier], tier: Tier, key: str, clock: FakeClock
    ) -> None:
        if not self.shared_storage:
            pytest.skip("not applicable: in-process tier")
        other = make_tier()
        other.bind(TierBinding(clock=clock, codec=JsonCodec(), namespace="contract"))
        try:
            entry = make_entry(key, "shared", clock())
            tier.set(key, entry)
            assert _same(other.get(key), entry, tier.max_ttl)
        finally:
            other.close()

    def test_async_face_matches_sync_face(self, tier: Tier, key: str, clock: FakeClock) -> None:
        async def scenario() -> None:
            entry = make_entry(key, {"a": 1}, clock())
            assert await tier.aget(key) is None
            await tier.aset(key, entry)
            assert _same(await tier.aget(key), entry, tier.max_ttl)
            assert _same(tier.get(key), entry, tier.max_ttl)
            more = [make_entry(f"{key}:{i}", i, clock()) for i in range(3)]
            await tier.aset_many([(e.key, e) for e in more])
            got = await tier.aget_many([e.key for e in more] + [key + ":none"])
            assert [g.value if g else None for g in got] == [0, 1, 2, None]
            await tier.adelete(key, next_version())
            assert await tier.aget(key) is None
            await tier.aclose()

        asyncio.run(scenario())

    def test_async_face_works_across_event_loops(self, tier: Tier, key: str, clock: FakeClock) -> None:
        entry = make_entry(key, "loops", clock())
        asyncio.run(tier.aset(key, entry))
        for _ in range(3):  # a handler calling asyncio.run per invocation, as on AWS Lambda
            assert _same(asyncio.run(tier.aget(key)), entry, tier.max_ttl)


class LeaseContract:
    """What a lease tier (:class:`~tiercache.tier.LeaseTier`) promises the core: one holder per
    key at a time, a release only by the holder's token, expiry after ``ttl`` (a crashed holder
    never blocks a key for longer), and waiters that get the holder's value.

    ``make_tier`` as for :class:`TierContract`: each call gives a tier sharing storage *and
    leases* with the others (two processes). ``waits`` is False for a one-process fake whose
    ``wait_for_entry`` answers at once instead of blocking until a write or the timeout.
    """

    waits = True

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def pair(self, make_tier: Callable[[], Tier], clock: FakeClock) -> Any:
        tiers = [make_tier(), make_tier()]
        for tier in tiers:
            assert isinstance(tier, LeaseTier) and tier.offers_lease
            tier.bind(TierBinding(clock=clock, codec=JsonCodec(), namespace="contract"))
        yield tiers
        for tier in tiers:
            tier.close()

    @pytest.fixture
    def key(self) -> str:
        return f"contract:lease-{uuid.uuid4().hex[:12]}"

    def test_one_holder_at_a_time(self, pair: list[Any], key: str) -> None:
        ours, other = pair
        token = ours.acquire_lease(key, 5.0)
        assert token
        assert other.acquire_lease(key, 5.0) is None
        assert ours.acquire_lease(key, 5.0) is None  # not re-entrant either
        ours.release_lease(key, token)

    def test_release_frees_the_key(self, pair: list[Any], key: str) -> None:
        ours, other = pair
        token = ours.acquire_lease(key, 5.0)
        ours.release_lease(key, token)
        again = other.acquire_lease(key, 5.0)
        assert again
        other.release_lease(key, again)

    def test_only_the_holders_token_releases(self, pair: list[Any], key: str) -> None:
        ours, other = pair
        token = ours.acquire_lease(key, 5.0)
        other.release_lease(key, "not-the-token")
        assert other.acquire_lease(key, 5.0) is None
        ours.release_lease(key, token)

    def test_a_lease_expires_after_its_ttl(self, pair: list[Any], key: str, clock: FakeClock) -> None:
        ours, other = pair
        assert ours.acquire_lease(key, 0.2)
        time.sleep(0.3)  # server-side expiry runs on real time ...
        clock.advance(0.3)  # ... a fake's on the bound clock
        token = other.acquire_lease(key, 5.0)
        assert token
        other.release_lease(key, token)

    def test_extending_keeps_the_lease(self, pair: list[Any], key: str, clock: FakeClock) -> None:
        ours, other = pair
        if not isinstance(ours, ExtendableLease):
            pytest.skip("this tier does not extend leases")
        holder: Any = ours
        token = holder.acquire_lease(key, 0.3)
        assert ours.extend_lease(key, token, 5.0) is True
        assert ours.extend_lease(key, "not-the-token", 5.0) is False
        time.sleep(0.4)
        clock.advance(0.4)
        assert other.acquire_lease(key, 5.0) is None
        holder.release_lease(key, token)
        assert ours.extend_lease(key, token, 5.0) is False  # released: nothing left to extend

    def test_a_waiter_gets_the_holders_value(self, pair: list[Any], key: str, clock: FakeClock) -> None:
        ours, other = pair
        token = ours.acquire_lease(key, 5.0)
        now = clock()
        entry = Entry(key, "v", created_at=now, fresh_until=now + 60, stale_until=now + 60, version=7)
        ours.set(key, entry)
        ours.release_lease(key, token)
        got = other.wait_for_entry(key, 2.0)
        assert got is not None and got.value == "v" and got.version == 7

    def test_a_waiter_gives_up_at_its_timeout(self, pair: list[Any], key: str) -> None:
        ours, other = pair
        if not self.waits:
            pytest.skip("this tier answers waiters at once")
        token = ours.acquire_lease(key, 5.0)
        t0 = time.perf_counter()
        assert other.wait_for_entry(key, 0.3) is None
        assert 0.2 <= time.perf_counter() - t0 < 2.0
        ours.release_lease(key, token)

    def test_async_face_matches(self, pair: list[Any], key: str) -> None:
        ours, other = pair

        async def main() -> None:
            token = await ours.aacquire_lease(key, 5.0)
            assert token
            assert await other.aacquire_lease(key, 5.0) is None
            await ours.arelease_lease(key, token)
            again = await other.aacquire_lease(key, 5.0)
            assert again
            await other.arelease_lease(key, again)
            for tier in (ours, other):
                await tier.aclose()

        asyncio.run(main())
