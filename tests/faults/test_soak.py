"""Bounded soak: tasks and threads hammer memory → Redis (and memory → KV → Redis) while faults hit."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults.harness import (
    FaultProxy,
    FaultSchedule,
    History,
    Step,
    latency_figures,
    report,
)
from tests.kv_fake import FakeKV, RetryAfterWitness
from tests.redis_servers import RedisServer
from tiercache import EventKind, TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier

pytestmark = [pytest.mark.redis, pytest.mark.slow]

RUN_SECONDS = float(os.environ.get("TIERCACHE_SOAK_SECONDS", "10"))
TASKS, THREADS = 8, 3
KEYS = [f"item{i}" for i in range(40)]
TTL, STALE_TTL = 1.0, 4.0
HANG_GUARD = 30.0  # a worker still running this long after the run's end is a hang: the test fails


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    p = FaultProxy(redis_server.port)
    try:
        yield p
    finally:
        p.close()


def run_load(cache: TieredCache, history: History, seconds: float, seed: int) -> int:
    """TASKS coroutines and THREADS threads doing 75 % get_cached, 15 % set, 10 % delete."""
    stop = time.monotonic() + seconds
    calls = [0] * (TASKS + THREADS)

    def choose(rng: random.Random) -> tuple[str, float]:
        return rng.choice(KEYS), rng.random()

    def sync_worker(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        while time.monotonic() < stop:
            key, roll = choose(rng)
            start = time.time()
            with history.op() as events:
                try:
                    if roll < 0.75:

                        def load(key: str = key) -> dict[str, Any]:
                            value = history.produce(key, "load")
                            time.sleep(0.002)
                            return value

                        history.record_read(key, start, cache.sync.get_cached(key, load), events)
                    elif roll < 0.9:
                        value = history.produce(key, "set")
                        cache.sync.set(key, value)
                        history.record_write(key, "set", value["s"], start, events)
                    else:
                        cache.sync.delete(key)
                        history.record_write(key, "delete", None, start, events)
                except Exception as exc:
                    history.record_error(exc, start)
            calls[n] += 1

    async def async_worker(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        while time.monotonic() < stop:
            key, roll = choose(rng)
            start = time.time()
            with history.op() as events:
                try:
                    if roll < 0.75:

                        async def load(key: str = key) -> dict[str, Any]:
                            value = history.produce(key, "load")
                            await asyncio.sleep(0.003)
                            return value

                        history.record_read(key, start, await cache.get_cached(key, load), events)
                    elif roll < 0.9:
                        value = history.produce(key, "set")
                        await cache.set(key, value)
                        history.record_write(key, "set", value["s"], start, events)
                    else:
                        await cache.delete(key)
                        history.record_write(key, "delete", None, start, events)
                except Exception as exc:
                    history.record_error(exc, start)
            calls[n] += 1

    async def async_side() -> None:
        await asyncio.wait_for(
            asyncio.gather(*(async_worker(THREADS + i) for i in range(TASKS))), seconds + HANG_GUARD
        )
        for t in threads:  # the sync workers finish before the cache closes (it then refuses calls)
            await asyncio.to_thread(t.join, seconds + HANG_GUARD)
        await cache.aclose()

    threads = [threading.Thread(target=sync_worker, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    asyncio.run(async_side())
    for t in threads:
        t.join(timeout=seconds + HANG_GUARD)
    assert not any(t.is_alive() for t in threads), "a sync worker hung"
    return sum(calls)


def lost_writes(history: History, reader: TieredCache, after: float) -> tuple[int, list[str]]:
    """Every key whose last operation was a set that every tier took (after ``after``, when the
    tier was last (re)started) and that is still alive must read back as exactly that value."""
    now = time.time()
    checked, lost = 0, []
    for key in KEYS:
        writes = sorted((w for w in history.writes if w.key == key), key=lambda w: w.end)
        if not writes:
            continue
        last = writes[-1]
        overlapped = any(w.end >= last.start for w in writes[:-1])
        reloaded = any(
            k == key and p.kind == "load" and p.start >= last.start for (k, _), p in history.produced.items()
        )
        if (
            last.kind != "set"
            or not last.durable
            or last.start <= after
            or overlapped
            or reloaded
            or last.start + TTL + STALE_TTL < now + 1.0
        ):
            continue
        checked += 1
        got = reader.sync.get(key, allow_stale=True)
        if got != {"k": key, "s": last.seq}:
            lost.append(f"{key}: wrote seq {last.seq} at {last.end:.3f}, read back {got!r}")
    return checked, lost


def first_success_after(history: History, tier: str, t: float) -> float | None:
    for when, event in history.events:
        if (
            when >= t
            and event.tier == tier
            and event.kind in (EventKind.HIT, EventKind.MISS, EventKind.STALE_HIT)
        ):
            return when - t
    return None


def test_soak_memory_redis_with_proxy_faults_and_a_redis_kill(
    redis_server: RedisServer, proxy: FaultProxy
) -> None:
    prefix = "soak" + uuid.uuid4().hex[:8]
    history = History(["redis"])
    cache = TieredCache(
        [MemoryTier(max_entries=1000), RedisTier(url=proxy.url, prefix=prefix)],
        ttl=TTL,
        stale_ttl=STALE_TTL,
        namespace="soak",
        breaker_threshold=3,
        breaker_cooldown=0.5,
        lease_ttl=2.0,
        lease_wait=0.5,
        on_event=history.on_event,
    )
    restarted: list[float] = []

    def restart() -> None:
        redis_server.start()
        restarted.append(time.time())

    r = RUN_SECONDS / 10  # the schedule scales with the run (10 s by default)
    schedule = FaultSchedule(
        [
            Step(
                1.0 * r,
                "proxy delay 15 ms/chunk",
                lambda: proxy.set_mode("delay", 0.015),
                1.0 * r,
                lambda: proxy.set_mode("pass"),
            ),
            Step(
                2.4 * r,
                "proxy stall",
                lambda: proxy.set_mode("stall"),
                0.7 * r,
                lambda: proxy.set_mode("pass"),
            ),
            Step(3.6 * r, "proxy reset (RST)", proxy.reset),
            Step(
                4.2 * r,
                "proxy drop (FIN + refuse)",
                lambda: proxy.set_mode("drop"),
                0.6 * r,
                lambda: proxy.set_mode("pass"),
            ),
            Step(5.2 * r, "proxy reset (RST)", proxy.reset),
            Step(6.0 * r, "redis SIGKILL, restart", redis_server.kill, 1.5 * r, restart),
        ],
        deadline=RUN_SECONDS,
    ).start()
    try:
        calls = run_load(cache, history, RUN_SECONDS, seed=1)
    finally:
        schedule.stop()
        proxy.set_mode("pass")
    assert schedule.errors == []
    assert len(restarted) == 1, "the schedule did not finish"

    verdict = history.check(ttl=TTL, stale_ttl=STALE_TTL, delay=0.05)
    reader = TieredCache(
        [MemoryTier(), RedisTier(url=redis_server.url, prefix=prefix)], ttl=TTL, namespace="soak"
    )
    checked, lost = lost_writes(history, reader, after=restarted[0])
    reader.sync.close()
    recovery = first_success_after(history, "redis", restarted[0])
    stats = cache.stats.tiers[1]
    latency = latency_figures(history, schedule.windows)
    figures: dict[str, object] = {
        "run_seconds": RUN_SECONDS,
        "workers": f"{TASKS} tasks + {THREADS} threads",
        "calls": calls,
        "reads_checked": verdict.reads,
        "faults_injected": schedule.injected,
        "faults": [w.name for w in schedule.windows],
        "redis_reads_answered": stats.hits + stats.misses + stats.stale_hits,
        "tier_errors_absorbed": stats.errors,
        "tier_calls_skipped_by_breaker": stats.skipped,
        "errors_surfaced": len(history.errors),
        "wrong_values": len(verdict.wrong),
        "superseded_reads": len(verdict.superseded),
        "stale_served": verdict.stale_served,
        "acknowledged_sets_checked": checked,
        "lost_writes": len(lost),
        "breaker_opened": stats.breaker_opened,
        "breaker_closed": stats.breaker_closed,
        "recovery_seconds_after_restart": None if recovery is None else round(recovery, 3),
        **latency,
    }
    report("soak-memory-redis", figures)
    assert history.errors == [], history.errors[:5]
    assert verdict.wrong == [], verdict.wrong[:5]
    assert verdict.superseded == [], verdict.superseded[:5]
    assert lost == [], lost[:5]
    assert calls > 500 and verdict.reads > 300
    assert stats.errors > 0 and stats.breaker_opened >= 1 and stats.breaker_closed >= 1
    assert recovery is not None and recovery <= 2.0
    # Bounded latency during faults: socket timeout (50 ms) + connect timeout (100 ms) per tier
    # call, the lease wait (0.5 s) at most once, and a loaded 2-core machine.
    assert latency["p99_ms_during_faults"] < 1500


def test_soak_memory_kv_redis_with_30_percent_kv_faults(redis_server: RedisServer, proxy: FaultProxy) -> None:
    prefix = "soakkv" + uuid.uuid4().hex[:8]
    budget = 500
    history = History(["kv", "redis"])
    with FakeKV(
        fault_rate=0.3,
        faults=("429", "500", "timeout"),
        timeout_delay=0.3,
        fault_retry_after=1,
        budget=budget,
        budget_window=60,
        seed=int(time.time()),
    ) as fake:
        witness = RetryAfterWitness()
        kv = witness.tier(fake, timeout=0.25, deadline=0.5, backoff=0.01, budget=budget, budget_window=60)
        cache = TieredCache(
            [MemoryTier(max_entries=1000), kv, RedisTier(url=proxy.url, prefix=prefix)],
            ttl=TTL,
            stale_ttl=STALE_TTL,
            namespace="soakkv",
            breaker_threshold=3,
            breaker_cooldown=0.5,
            lease_ttl=2.0,
            lease_wait=0.5,
            on_event=history.on_event,
        )
        seconds = RUN_SECONDS * 0.8
        r = seconds / 8
        schedule = FaultSchedule(
            [
                Step(
                    1.5 * r,
                    "proxy stall",
                    lambda: proxy.set_mode("stall"),
                    0.6 * r,
                    lambda: proxy.set_mode("pass"),
                ),
                Step(3.5 * r, "proxy reset (RST)", proxy.reset),
                Step(
                    5.0 * r,
                    "proxy drop (FIN + refuse)",
                    lambda: proxy.set_mode("drop"),
                    0.5 * r,
                    lambda: proxy.set_mode("pass"),
                ),
            ],
            deadline=seconds,
        ).start()
        # Random faults (30 %) at a time-based seed, and one of each kind up front, so a run
        # whose random draws happen to miss a kind still exercises it.
        for kind in ("500", "timeout", "429"):
            fake.fail_next(1, kind)
        try:
            calls = run_load(cache, history, seconds, seed=2)
        finally:
            schedule.stop()
            proxy.set_mode("pass")
            fake.set_faults(0.0)
        kv.close()  # sends parked writes (bounded)
        verdict = history.check(ttl=TTL, stale_ttl=STALE_TTL, delay=TTL + kv.write_interval + kv.deadline)
        kv_faults = dict(fake.stats.faults)
        figures = {
            "run_seconds": seconds,
            "workers": f"{TASKS} tasks + {THREADS} threads",
            "calls": calls,
            "reads_checked": verdict.reads,
            "faults_injected": schedule.injected + sum(kv_faults.values()),
            "kv_faults": kv_faults,
            "kv_requests": fake.stats.requests,
            "proxy_faults": [w.name for w in schedule.windows],
            "errors_surfaced": len(history.errors),
            "wrong_values": len(verdict.wrong),
            "superseded_reads": len(verdict.superseded),
            "stale_served": verdict.stale_served,
            "budget_used": fake.budget_used(),
            "budget": budget,
            "budget_exceeded": fake.stats.budget_exceeded,
            # Judged on arrival at the fake, which can trail the client by a GIL-starved half second:
            "late_arrivals_during_a_block": fake.stats.retry_after_violations,
            # Judged on the client's clock: sent after the client had read a 429 that still ran.
            "retry_after_violations": len(witness.violations()),
            "kv_429_answers_read": kv.stats.rate_limited,
            "kv_skipped_for_retry_after": kv.stats.skipped_retry_after,
            "kv_breaker_opened": cache.stats.tiers[1].breaker_opened,
            "redis_breaker_opened": cache.stats.tiers[2].breaker_opened,
            "redis_breaker_closed": cache.stats.tiers[2].breaker_closed,
            **latency_figures(history, schedule.windows),
        }
        report("soak-memory-kv-redis", figures)
        assert schedule.errors == []
        assert history.errors == [], history.errors[:5]
        assert verdict.wrong == [], verdict.wrong[:5]
        assert verdict.superseded == [], verdict.superseded[:5]
        assert calls > 300
        assert all(kv_faults[k] > 0 for k in ("429", "500", "timeout"))
        assert fake.stats.budget_exceeded == 0 and fake.budget_used() <= budget
        assert witness.rate_limited() >= fake.stats.faults["429"]  # the witness saw every 429
        assert witness.violations() == []
        assert fake.violations == []
