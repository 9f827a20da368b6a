"""With SignedCodec, RedisTier's record header (kind, version, expiry) is authenticated too: a
rewritten header or a forged tombstone is a corrupt miss and is replaced by the next genuine
write instead of pinning the key forever (issue 15)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.redis_servers import purge_prefix
from tiercache import TieredCache
from tiercache._entry import next_version
from tiercache.adapters.redis import RedisTier
from tiercache.signing import SignedCodec
from tiercache.testing import make_entry

pytestmark = pytest.mark.redis

KEY = b"s" * 32


@pytest.fixture
def setup(shared_redis_url: str) -> Iterator[tuple[TieredCache, RedisTier, redis.Redis]]:
    prefix = f"tctest-sr-{uuid.uuid4().hex[:8]}"
    tier = RedisTier(url=shared_redis_url, prefix=prefix)
    cache = TieredCache([tier], codec=SignedCodec([KEY]), namespace="sr")
    client = redis.Redis.from_url(shared_redis_url)
    yield cache, tier, client
    cache.sync.close()
    client.close()
    purge_prefix(shared_redis_url, prefix)


def test_a_rewritten_header_is_rejected_and_healed_by_the_next_write(
    setup: tuple[TieredCache, RedisTier, redis.Redis],
) -> None:
    cache, tier, client = setup
    cache.sync.set("k", "genuine")
    vkey = tier._vkey("sr:k")
    record = client.get(vkey)
    assert record is not None
    client.set(vkey, record[:4] + b"9" * 20 + record[24:])  # pin: a huge version, same body
    assert cache.sync.get("k") is None and cache.stats.tiers[0].corrupt == 1
    cache.sync.set("k", "newer")  # the fence refuses, finds the header forged, replaces it
    assert cache.sync.get("k") == "newer"
    asyncio.run(cache.set("k", "async newer"))
    assert cache.sync.get("k") == "async newer"


def test_a_forged_tombstone_without_ttl_does_not_block_writes(
    setup: tuple[TieredCache, RedisTier, redis.Redis],
) -> None:
    cache, tier, client = setup
    for name, write in (
        ("sync", lambda: cache.sync.set("t", 1)),
        ("async", lambda: asyncio.run(cache.set("t", 1))),
    ):
        vkey = tier._vkey("sr:t")
        client.set(vkey, b"tc1d" + b"9" * 20)  # no MAC, no TTL
        write()
        assert cache.sync.get("t") == 1, name
    client.set(tier._vkey("sr:m"), b"tc1d" + b"9" * 20)
    tier.set_many([("sr:m", make_entry("sr:m", 5, cache.clock()))])
    assert cache.sync.get("m") == 5


def test_a_forged_expiry_header_is_a_corrupt_miss(setup: tuple[TieredCache, RedisTier, redis.Redis]) -> None:
    cache, tier, client = setup
    cache.sync.set("e", "v")
    vkey = tier._vkey("sr:e")
    record = client.get(vkey)
    assert record is not None
    client.set(vkey, b"tc1e" + b"9" * 20 + b"%-24s" % b"1.0" + record[24:])
    assert cache.sync.get("e") is None
    assert cache.stats.tiers[0].corrupt == 1


def test_genuine_tombstones_and_expiry_still_work(setup: tuple[TieredCache, RedisTier, redis.Redis]) -> None:
    cache, tier, client = setup
    now = cache.clock()
    old = make_entry("sr:d", "old", now)
    tier.set("sr:d", old)
    tier.delete("sr:d", next_version())
    assert len(client.get(tier._vkey("sr:d")) or b"") == 24 + 64  # header + MAC
    tier.set("sr:d", old)  # older than the genuine tombstone: still refused
    assert tier.get("sr:d") is None
    fresh = make_entry("sr:x", "x", now, ttl=60, stale_ttl=60)
    tier.set("sr:x", fresh)
    version = next_version()
    tier.expire("sr:x", now + 1, version)
    got = tier.get("sr:x")
    assert got is not None and got.value == "x" and got.fresh_until == now + 1 and got.version == version
    asyncio.run(tier.aexpire("sr:x", now + 0.5, next_version()))
    again = tier.get("sr:x")
    assert again is not None and again.fresh_until == now + 0.5


class _RacingClient:
    """The tier's client, running ``during`` (another writer) right after the first GET a write
    makes to look at the record its fence refused."""

    def __init__(self, real: redis.Redis, during: object) -> None:
        self._real = real
        self._during = during

    def get(self, name: object) -> object:
        found = self._real.get(name)  # type: ignore[arg-type]
        during, self._during = self._during, None
        if callable(during):
            during()
        return found

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


def test_a_newer_write_racing_an_older_one_over_a_forged_record_wins(
    setup: tuple[TieredCache, RedisTier, redis.Redis],
) -> None:
    cache, tier, client = setup
    now = cache.clock()
    older = make_entry("sr:r", "older", now, version=next_version())
    newer = make_entry("sr:r", "newer", now, version=next_version())
    client.set(tier._vkey("sr:r"), b"tc1d" + b"9" * 20)  # forged, pins every write
    real = tier._sync_client()
    # the newer write finds the forged record; meanwhile the older write heals the key first
    tier._sync = _RacingClient(real, lambda: tier.set("sr:r", older))  # type: ignore[assignment]
    try:
        tier.set("sr:r", newer)
    finally:
        tier._sync = real
    got = tier.get("sr:r")
    assert got is not None and got.value == "newer"  # never the older write's value


def test_a_forger_that_keeps_rewriting_costs_a_write_a_few_round_trips_not_a_loop(
    setup: tuple[TieredCache, RedisTier, redis.Redis],
) -> None:
    cache, tier, client = setup
    vkey = tier._vkey("sr:f")
    real = tier._sync_client()
    gets = 0

    class Forger(_RacingClient):
        """Forges the record again before every command the tier sends."""

        def get(self, name: object) -> object:
            nonlocal gets
            gets += 1
            client.set(vkey, b"tc1d" + b"9" * 20)
            return self._real.get(name)  # type: ignore[arg-type]

        def eval(self, *args: object) -> object:
            client.set(vkey, b"tc1d" + b"8" * 20)
            return self._real.eval(*args)  # type: ignore[arg-type]

        def evalsha(self, *args: object) -> object:
            client.set(vkey, b"tc1d" + b"8" * 20)
            return self._real.evalsha(*args)  # type: ignore[arg-type]

    tier._sync = Forger(real, None)  # type: ignore[assignment]
    try:
        tier.set("sr:f", make_entry("sr:f", 1, cache.clock()))
    finally:
        tier._sync = real
    assert 1 <= gets <= 4
