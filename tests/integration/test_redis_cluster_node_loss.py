"""A Redis Cluster losing one master under load: the live slots keep answering from Redis."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.crc import key_slot

from tests.redis_servers import RedisClusterProcesses, command
from tiercache import TieredCache
from tiercache.adapters.redis import RedisTier

pytestmark = [pytest.mark.redis, pytest.mark.slow]

KEYS = 300


@pytest.fixture
def doomed_cluster() -> Iterator[RedisClusterProcesses]:
    """Three masters, no replicas; a master's loss leaves the others serving their slots
    (``cluster-require-full-coverage no``: without replicas, nothing can take its slots over)."""
    cluster = RedisClusterProcesses(masters=3, extra=["--cluster-require-full-coverage", "no"]).start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


def _owner(cluster: RedisClusterProcesses) -> dict[int, int]:
    """slot -> port of its master."""
    owners: dict[int, int] = {}
    for port in cluster.ports:
        for line in command(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "myself" not in fields[2]:
                continue
            for part in fields[8:]:
                if "[" in part:
                    continue
                lo, _, hi = part.partition("-")
                for slot in range(int(lo), int(hi or lo) + 1):
                    owners[slot] = port
    return owners


def _share_from_redis(lookups: list[tuple[str, str]], live: set[str]) -> tuple[float, int]:
    mine = [source for key, source in lookups if key in live]
    return (sum(1 for s in mine if s == "L1") / len(mine) if mine else 0.0), len(mine)


@pytest.mark.parametrize("auto_batch", [True, False])
def test_one_dead_master_costs_only_its_own_slots(
    doomed_cluster: RedisClusterProcesses, auto_batch: bool, caplog: pytest.LogCaptureFixture
) -> None:
    tier = RedisTier(url=doomed_cluster.url, prefix="nl")
    cache = TieredCache([tier], ttl=600, namespace="nl", auto_batch=auto_batch)
    owners = _owner(doomed_cluster)
    victim = doomed_cluster.nodes[1]
    keys = [f"k{i}" for i in range(KEYS)]
    vkeys = {k: tier._vkey(f"nl:{k}") for k in keys}
    live = {k for k in keys if owners[key_slot(vkeys[k].encode())] != victim.port}
    assert 0 < len(live) < KEYS

    async def load() -> Any:
        return "loaded"

    async def main() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        for k in keys:
            await cache.set(k, "cached")
        before: list[tuple[str, str]] = []
        after: list[tuple[str, str]] = []
        rng = random.Random(7)
        killed_at = None
        started = time.monotonic()
        while time.monotonic() - started < 4.0:
            batch = rng.sample(keys, 50)
            got = await asyncio.gather(*(cache.lookup(k, load) for k in batch))
            sink = after if killed_at is not None else before
            sink.extend((k, g.source) for k, g in zip(batch, got, strict=True))
            if killed_at is None and time.monotonic() - started > 0.5:
                victim.kill()
                killed_at = time.monotonic()
        await tier.aclose()  # this loop's clients; the cache stays open for the sync face
        return before, after

    try:
        before, after = asyncio.run(main())
        share_before, _ = _share_from_redis(before, live)
        share_after, n = _share_from_redis(after, live)
        red = cache.stats.tiers[0]
        print(
            f"auto_batch={auto_batch}: live-slot answers from Redis {share_before:.3f} before, "
            f"{share_after:.3f} after the kill ({n} lookups); errors {red.errors}, skipped {red.skipped}, "
            f"breaker openings {red.breaker_opened}"
        )
        assert share_before == 1.0
        assert n > 500
        assert share_after >= 0.95, (share_after, n, cache.stats.snapshot())
        # the sync face, the master still dead: single reads and a batch across all nodes
        sample = random.Random(8).sample(keys, 100)
        sync = [(k, cache.sync.lookup(k, lambda: "loaded").source) for k in sample]
        assert _share_from_redis(sync, live)[0] >= 0.95
        batch = cache.sync.get_many_cached(sample, lambda missing: dict.fromkeys(missing, "loaded"))
        assert all(batch[k] == "cached" for k in sample if k in live)
        assert red.errors > 0  # the dead node's keys are counted as tier errors...
        assert red.breaker_opened == 0  # ...but the tier-wide breaker stays closed
        warned = [r.getMessage() for r in caplog.records if r.name == "tiercache.redis"]
        assert any(f"node 127.0.0.1:{victim.port} failed" in w for w in warned), warned
    finally:
        cache.sync.close()
