"""CloudflareKVTier inside TieredCache: a fault-injected memory → KV → loader run, and memory → KV → Redis."""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.cloudflare_kv.conftest import tier_factory
from tests.kv_fake import FakeKV, RetryAfterWitness
from tiercache import EventKind, TieredCache
from tiercache._events import Event
from tiercache.adapters._kv_protocol import kv_key_for
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock

RUN_SECONDS = 2.5
BUDGET = 150  # per 60 s: small enough that the run spends it and the tier must skip itself


@pytest.fixture(params=[("429", "500", "timeout"), ("500", "timeout")], ids=["with-429", "5xx-and-timeouts"])
def faulty_fake(request: pytest.FixtureRequest) -> Iterator[FakeKV]:
    """30 % of requests fail. Each 429 blocks the tier for a second, so the mix without 429s is
    what drives enough traffic to spend the budget."""
    with FakeKV(
        fault_rate=0.3,
        faults=request.param,
        timeout_delay=0.3,
        fault_retry_after=1,
        budget=BUDGET,
        budget_window=60,
        seed=11,
    ) as fake:
        for kind in fake.faults:  # one of each up front: the random draws alone may miss a kind
            fake.fail_next(1, kind)
        yield fake


def test_memory_kv_loader_chain_with_30_percent_faults(faulty_fake: FakeKV) -> None:
    witness = RetryAfterWitness()
    kv = witness.tier(faulty_fake, timeout=0.1, deadline=0.3, backoff=0.01, budget=BUDGET, budget_window=60)
    events: list[Event] = []
    cache = TieredCache([MemoryTier(max_entries=5), kv], ttl=30, namespace="faults", on_event=events.append)
    keys = [f"item:{i}" for i in range(300)]
    errors: list[BaseException] = []
    wrong: list[tuple[str, object]] = []
    calls = [0]
    stop = time.monotonic() + RUN_SECONDS

    def expected(key: str) -> dict[str, object]:
        return {"key": key, "data": [key.upper(), len(key)]}

    def check(key: str, value: object) -> None:
        calls[0] += 1
        if value != expected(key):
            wrong.append((key, value))

    def sync_worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            key = rng.choice(keys)
            try:
                roll = rng.random()
                if roll < 0.8:
                    check(key, cache.sync.get_cached(key, functools.partial(expected, key)))
                elif roll < 0.95:
                    cache.sync.set(key, expected(key))
                    calls[0] += 1
                else:
                    cache.sync.delete(key)
                    calls[0] += 1
            except Exception as exc:
                errors.append(exc)

    async def async_worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            key = rng.choice(keys)

            async def load(key: str = key) -> dict[str, object]:
                return expected(key)

            try:
                check(key, await cache.get_cached(key, load))
            except Exception as exc:
                errors.append(exc)

    async def async_side() -> None:
        await asyncio.gather(*(async_worker(100 + i) for i in range(3)))

    threads = [threading.Thread(target=sync_worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    asyncio.run(async_side())
    for t in threads:
        t.join()
    cache.sync.close()

    stats, fake = kv.stats, faulty_fake.stats
    tier_errors = sum(1 for e in events if e.kind == EventKind.TIER_ERROR)
    print(
        f"\nfault run: {calls[0]} calls, {fake.requests} requests at the fake, faults injected "
        f"{fake.faults}, tier errors absorbed {tier_errors}, errors surfaced {len(errors)}, "
        f"budget used {faulty_fake.budget_used()}/{BUDGET}, skipped for budget {stats.skipped_budget}, "
        f"skipped for Retry-After {stats.skipped_retry_after}, retries {stats.retries}, "
        f"in flight when a 429 was sent {fake.in_flight_during_block}, late arrivals during a block "
        f"{fake.retry_after_violations}, deferred writes "
        f"{stats.deferred_writes}"
    )
    assert errors == [] and wrong == []
    assert calls[0] > 50  # the run did real work (hundreds of calls on an idle machine)
    assert all(fake.faults[kind] > 0 for kind in faulty_fake.faults)  # every kind really happened
    assert fake.budget_exceeded == 0 and faulty_fake.budget_used() <= BUDGET
    # Retry-After is judged on the client's clock (see tests/kv_fake/observer.py); the fake's own
    # count, judged on arrival, is printed above as "late arrivals".
    assert witness.rate_limited() >= fake.faults.get("429", 0)
    assert witness.violations() == []
    assert fake.write_rate_violations == 0
    assert faulty_fake.violations == []


# --- memory → KV → Redis → loader ---------------------------------------------------------------


@pytest.mark.redis
def test_three_tier_chain_backfills_with_the_kv_60s_floor(
    fake: FakeKV, shared_redis_url: str, redis_prefix: str
) -> None:
    from tests.redis_servers import purge_prefix
    from tiercache.adapters.redis import RedisTier

    clock = FakeClock()
    namespace = "chain" + uuid.uuid4().hex[:8]
    events: list[Event] = []
    writer = TieredCache(
        [RedisTier(url=shared_redis_url, prefix=redis_prefix)], ttl=10, namespace=namespace, clock=clock
    )
    memory, kv = MemoryTier(), tier_factory(fake)()
    reader = TieredCache(
        [memory, kv, RedisTier(url=shared_redis_url, prefix=redis_prefix)],
        ttl=10,
        namespace=namespace,
        clock=clock,
        on_event=events.append,
    )
    second_memory = MemoryTier()
    second = TieredCache(
        [second_memory, tier_factory(fake)(), RedisTier(url=shared_redis_url, prefix=redis_prefix)],
        ttl=10,
        namespace=namespace,
        clock=clock,
        on_event=events.append,
    )
    loads: list[str] = []

    def loader() -> object:
        loads.append("x")
        return "loaded"

    try:
        written_at = clock()
        writer.sync.set("user:1", {"name": "Ada"})
        clock.advance(3)
        assert reader.sync.get_cached("user:1", loader) == {"name": "Ada"}  # from Redis
        assert loads == []
        full = f"{namespace}:user:1"
        # Back-filled into KV and L1 with the entry's own lifetime: 7 s left, not a fresh 10.
        in_kv = kv.get(full)
        assert in_kv is not None and in_kv.stale_until == pytest.approx(written_at + 10)
        assert memory.get(full) is not None and memory.get(full).stale_until == pytest.approx(written_at + 10)  # type: ignore[union-attr]
        stored = fake.store[kv_key_for(full)]
        assert stored.expires is not None and stored.expires - time.time() >= 59  # KV's 60 s floor
        # Another process finds it in KV (an L2 hit there) and back-fills only its L1.
        events.clear()
        assert second.sync.get_cached("user:1", loader) == {"name": "Ada"} and loads == []
        assert [(e.kind, e.tier) for e in events if e.kind == EventKind.HIT] == [(EventKind.HIT, "kv")]
        # Past the entry's own expiry everything is a miss, though KV still holds the bytes.
        clock.advance(8)
        assert fake.live_value(kv_key_for(full)) is not None
        assert reader.sync.get_cached("user:1", loader) == "loaded" and loads == ["x"]
    finally:
        writer.sync.close()
        reader.sync.close()
        second.sync.close()
        purge_prefix(shared_redis_url, redis_prefix)
