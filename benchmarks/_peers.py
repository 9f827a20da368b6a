"""Scenarios shared by ``test_peers.py`` (pytest-benchmark) and ``report.py``: tiercache beside its peers.

Every scenario builds its cases once (decorated functions, clients, filled keys) and exposes each
as a zero-argument callable that runs one batch; ``per_call`` divides a batch's time into a
per-operation time. Redis scenarios run against a redis-server this module starts on a free
loopback port (persistence off) and stops by its PID, so ``INFO commandstats`` counts only our own
commands and nothing touches the shared server. Peers are imported lazily: install ``.[bench]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from tiercache import TieredCache, tiered_cache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier

SYNC_BATCH = 1000  # calls per timed batch for in-process hits (amortises the timer)
ASYNC_BATCH = 1000  # awaits per batch for async in-process hits (amortises the loop entry)
L2_BATCH = 200  # awaits per batch for one-at-a-time Redis hits
CONCURRENT = 1000  # distinct keys read concurrently
MANY = 100  # keys per get_many
STAMPEDE_CALLERS = 100
STAMPEDE_LOAD = 0.05  # seconds the loader of a cold key takes
VALUE = {"id": 42, "name": "Ada Lovelace", "email": "ada@example.com", "roles": ["admin", "user"], "n": 3.5}

# Generous tier timeouts: this measures throughput on a loaded 2-core box, not the timeout policy
# (with the defaults, 1,000 reads queued on 32 connections time out in the pool and become misses).
TIER_OPTIONS: dict[str, Any] = {"socket_timeout": 2.0, "connect_timeout": 2.0, "pool_timeout": 10.0}


# --- a redis-server of our own ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    """A throwaway redis-server on a free loopback port; ``stop`` ends it by PID."""

    def __init__(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not on the PATH")
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="tc-bench-redis-")
        self.proc = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--maxclients",
                "4000",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("redis-server did not start")
        import redis

        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.admin = redis.Redis(host="127.0.0.1", port=self.port, protocol=2)
        self.version = str(self.admin.info("server")["redis_version"])

    def reset_stats(self) -> None:
        self.admin.config_resetstat()

    def commands(self) -> dict[str, int]:
        """Calls per command since the last reset (our own INFO/CONFIG left out)."""
        stats = self.admin.info("commandstats")
        out = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        return {k: v for k, v in out.items() if k not in ("info", "config|resetstat", "config")}

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.admin.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- scenarios ------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One contender: ``run()`` executes a batch of ``per_call`` operations."""

    run: Callable[[], Any]
    per_call: int


@dataclass
class Group:
    """A ratio table: every member divided by ``baseline`` (``target``: tiercache's ceiling)."""

    name: str
    baseline: str
    members: list[str]
    target: tuple[str, float] | None = None  # (case, maximum ratio to the baseline)


@dataclass
class Scenario:
    """A named set of cases measured together, and the groups their ratios are reported in."""

    title: str
    cases: dict[str, Case] = field(default_factory=dict)
    groups: list[Group] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    probes: dict[str, Callable[[], Any]] = field(default_factory=dict)  # extra facts, run after timing

    def close(self) -> None:
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                closer()


# Case names, and the groups their ratios are reported in (one baseline each; the first group of
# a scenario lists every case). ``test_peers.py`` parametrizes over these without building anything.
TC_SYNC = "tiercache @tiered_cache key=template"
TC_ASYNC = "tiercache @tiered_cache key=template"
CASHEWS_MEM = "cashews @cache(ttl) mem://"
RAW_GET = "raw redis.asyncio GET + orjson.loads"
TC_L2 = "tiercache get_cached (RedisTier only)"
RAW_32 = "raw redis.asyncio GET x1,000 (gather), 32 connections"
RAW_WIDE = "raw redis.asyncio GET x1,000 (gather), 1,000 connections"
TC_GATHER = "tiercache get_cached x1,000 (gather)"
# The same decorated function and cache with ``metrics=False``: what the counters cost on a hit.
TC_METRICS_OFF = "tiercache @tiered_cache key=template, metrics=False"
GROUPS: dict[str, list[Group]] = {
    "sync_l1_hit": [
        Group(
            "sync-l1-hit",
            "cachetools.cached(TTLCache)",
            [
                "plain call (floor)",
                "functools.lru_cache",
                "cachetools.cached(TTLCache)",
                "cachebox.cached(TTLCache)",
                "dogpile.cache memory region",
                TC_SYNC,
                "tiercache @tiered_cache default key",
            ],
            target=(TC_SYNC, 0.5),
        ),
        Group("sync-l1-hit-metrics", TC_METRICS_OFF, [TC_SYNC, TC_METRICS_OFF], target=(TC_SYNC, 1.10)),
    ],
    "async_l1_hit": [
        Group(
            "async-l1-hit",
            "bare await (floor)",
            ["bare await (floor)", TC_ASYNC, CASHEWS_MEM, "aiocache @cached in-memory"],
            target=(TC_ASYNC, 4.0),
        ),
        Group("async-l1-hit-vs-cashews", CASHEWS_MEM, [TC_ASYNC, CASHEWS_MEM], target=(TC_ASYNC, 0.05)),
        Group("async-l1-hit-metrics", TC_METRICS_OFF, [TC_ASYNC, TC_METRICS_OFF], target=(TC_ASYNC, 1.10)),
    ],
    "l2_hit": [
        Group(
            "l2-hit",
            RAW_GET,
            [
                RAW_GET,
                TC_L2,
                "tiercache @tiered_cache (RedisTier only)",
                "cashews @cache(ttl) redis://",
                "aiocache @cached RedisCache",
            ],
            target=(TC_L2, 1.15),
        )
    ],
    "l2_concurrent": [
        Group(
            "l2-concurrent-1000",
            RAW_32,
            [RAW_32, RAW_WIDE, TC_GATHER, "raw MGET of 1,000 (floor)"],
            target=(TC_GATHER, 0.35),
        ),
        Group("l2-concurrent-1000-vs-wide", RAW_WIDE, [TC_GATHER, RAW_WIDE], target=(TC_GATHER, 0.35)),
    ],
    "get_many": [
        Group(
            "get-many-100",
            "raw MGET + orjson.loads",
            [
                "raw MGET + orjson.loads",
                "tiercache get_many_cached",
                "tiercache get_cached x100 (gather)",
                "cashews get_many redis://",
                "aiocache multi_get RedisCache",
            ],
        )
    ],
}


def _sync_batch(fn: Callable[[int], Any]) -> Callable[[], None]:
    fn(42)

    def batch() -> None:
        for _ in range(SYNC_BATCH):
            fn(42)

    return batch


def _plain(user_id: int) -> int:
    return user_id


async def _trivial(user_id: int) -> int:
    return user_id


def _memory_cache(metrics: bool = True) -> TieredCache:
    return TieredCache([MemoryTier(max_entries=10_000)], ttl=3600, namespace="bench", metrics=metrics)


def sync_l1_hit() -> Scenario:
    """A decorated sync function answering from memory, beside the sync caches a user might pick."""
    import cachebox
    import cachetools
    from dogpile.cache import make_region

    s = Scenario("sync decorator, L1 hit (ns per call)")
    region = make_region().configure("dogpile.cache.memory", expiration_time=3600)
    fns: dict[str, Callable[[int], Any]] = {
        "plain call (floor)": _plain,
        "functools.lru_cache": functools.lru_cache(maxsize=10_000)(_plain),
        "cachetools.cached(TTLCache)": cachetools.cached(cachetools.TTLCache(maxsize=10_000, ttl=3600))(
            _plain
        ),
        "cachebox.cached(TTLCache)": cachebox.cached(cachebox.TTLCache(10_000, 3600))(_plain),
        "dogpile.cache memory region": region.cache_on_arguments()(_plain),
        "tiercache @tiered_cache key=template": tiered_cache(_memory_cache(), key="user:{user_id}")(_plain),
        "tiercache @tiered_cache default key": tiered_cache(_memory_cache())(_plain),
        TC_METRICS_OFF: tiered_cache(_memory_cache(metrics=False), key="user:{user_id}")(_plain),
    }
    s.cases = {name: Case(_sync_batch(fn), SYNC_BATCH) for name, fn in fns.items()}
    s.groups = GROUPS["sync_l1_hit"]
    return s


class _Loop:
    """One event loop per scenario; ``batch`` turns an awaitable factory into a timed callable."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def batch(self, fn: Callable[[], Awaitable[Any]], n: int) -> Callable[[], None]:
        async def many() -> None:
            for _ in range(n):
                await fn()

        self.run(many())  # warm up (and fill, for decorators)
        return lambda: self.run(many())

    def close(self) -> None:
        """As ``asyncio.run`` ends: cancel what is left (RedisTier's per-loop keeper closes its client)."""
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        with contextlib.suppress(Exception):
            self.run(asyncio.gather(*pending, return_exceptions=True))
            self.run(self.loop.shutdown_asyncgens())
        self.loop.close()


def async_l1_hit() -> Scenario:
    """A decorated coroutine function answering from memory, beside cashews and aiocache in memory."""
    from aiocache import cached as aio_cached
    from cashews import Cache

    s = Scenario("async decorator, L1 hit (ns per call)")
    lp = _Loop()
    cashews_mem = Cache()
    cashews_mem.setup("mem://")
    fns: dict[str, Callable[[int], Awaitable[Any]]] = {
        "bare await (floor)": _trivial,
        "tiercache @tiered_cache key=template": tiered_cache(_memory_cache(), key="user:{user_id}")(_trivial),
        "cashews @cache(ttl) mem://": cashews_mem(ttl=3600)(_trivial),
        "aiocache @cached in-memory": aio_cached(ttl=3600)(_trivial),
        TC_METRICS_OFF: tiered_cache(_memory_cache(metrics=False), key="user:{user_id}")(_trivial),
    }
    s.cases = {
        name: Case(lp.batch(functools.partial(fn, 42), ASYNC_BATCH), ASYNC_BATCH) for name, fn in fns.items()
    }
    s.groups = GROUPS["async_l1_hit"]
    s.closers = [lp.close, lambda: lp.run(cashews_mem.close())]
    return s


def _redis_only(url: str, prefix: str, **options: Any) -> TieredCache:
    tier = RedisTier(url=url, prefix=prefix, **{**TIER_OPTIONS, **options})
    return TieredCache([tier], ttl=3600, namespace="bench")


def _never() -> Any:
    raise AssertionError("the loader must not run: the value is in Redis")


def l2_hit(server: OwnRedis) -> Scenario:
    """One value in Redis read one call at a time (no L1): tiercache beside a raw GET and the peers."""
    import redis.asyncio
    from aiocache import RedisCache
    from aiocache import cached as aio_cached
    from cashews import Cache

    s = Scenario("L2 (Redis) hit, one at a time (µs per call)")
    lp = _Loop()
    prefix = "b-" + uuid.uuid4().hex[:6]
    raw = redis.asyncio.Redis.from_url(server.url, protocol=2)
    cache = _redis_only(server.url, prefix)
    cashews_redis = Cache()
    cashews_redis.setup(server.url, suppress=False)

    async def fill() -> None:
        await raw.set(f"{prefix}:raw", orjson.dumps(VALUE))
        await cache.set("user", VALUE)

    lp.run(fill())

    async def raw_get() -> Any:
        return orjson.loads(await raw.get(f"{prefix}:raw"))

    async def tc_get() -> Any:
        return await cache.get_cached("user", _never)

    async def load(user_id: int) -> dict[str, Any]:
        return VALUE

    tc_fn = tiered_cache(cache, key="user:{user_id}")(load)
    cashews_fn = cashews_redis(ttl=3600, prefix=prefix)(load)
    aio_fn = aio_cached(
        ttl=3600, cache=RedisCache, endpoint="127.0.0.1", port=server.port, namespace=prefix + "aio"
    )(load)
    aio = aio_fn.cache  # type: ignore[attr-defined]
    fns: dict[str, Callable[[], Awaitable[Any]]] = {
        "raw redis.asyncio GET + orjson.loads": raw_get,
        "tiercache get_cached (RedisTier only)": tc_get,
        "tiercache @tiered_cache (RedisTier only)": functools.partial(tc_fn, 42),
        "cashews @cache(ttl) redis://": functools.partial(cashews_fn, 42),
        "aiocache @cached RedisCache": functools.partial(aio_fn, 42),
    }
    s.cases = {name: Case(lp.batch(fn, L2_BATCH), L2_BATCH) for name, fn in fns.items()}
    s.groups = GROUPS["l2_hit"]

    async def shutdown() -> None:
        await raw.aclose()
        await cache.aclose()
        await cashews_redis.close()
        await aio.close()

    s.closers = [lp.close, lambda: lp.run(shutdown())]
    return s


def l2_concurrent(server: OwnRedis) -> Scenario:
    """1,000 distinct keys in Redis read at once (asyncio.gather), no L1."""
    import redis.asyncio

    s = Scenario(f"{CONCURRENT:,} concurrent distinct-key L2 reads (µs per read)")
    lp = _Loop()
    prefix = "c-" + uuid.uuid4().hex[:6]

    def client(max_connections: int) -> Any:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            server.url, max_connections=max_connections, timeout=10, protocol=2
        )
        return redis.asyncio.Redis(connection_pool=pool)

    raw = client(32)  # the same cap as RedisTier's pool
    wide = client(CONCURRENT)  # one connection per read in flight
    cache = _redis_only(server.url, prefix)
    keys = [f"k{i}" for i in range(CONCURRENT)]
    raw_keys = [f"{prefix}:raw:{k}" for k in keys]
    loads = [0]

    def loader() -> Any:
        loads[0] += 1
        return VALUE

    async def fill() -> None:
        await raw.mset({k: orjson.dumps(VALUE) for k in raw_keys})
        for k in keys:
            await cache.set(k, VALUE)

    lp.run(fill())

    def gather(client: Any) -> Callable[[], Awaitable[Any]]:
        async def one(key: str) -> Any:
            return orjson.loads(await client.get(key))

        async def run() -> Any:
            return await asyncio.gather(*(one(k) for k in raw_keys))

        return run

    async def tc_run() -> Any:
        return await asyncio.gather(*(cache.get_cached(k, loader) for k in keys))

    async def mget() -> Any:
        return [orjson.loads(v) for v in await raw.mget(raw_keys)]

    fns: dict[str, Callable[[], Awaitable[Any]]] = {
        "raw redis.asyncio GET x1,000 (gather), 32 connections": gather(raw),
        "raw redis.asyncio GET x1,000 (gather), 1,000 connections": gather(wide),
        "tiercache get_cached x1,000 (gather)": tc_run,
        "raw MGET of 1,000 (floor)": mget,
    }
    s.cases = {name: Case(lp.batch(fn, 1), CONCURRENT) for name, fn in fns.items()}
    s.groups = GROUPS["l2_concurrent"]
    s.notes.append(
        "The raw baselines use a BlockingConnectionPool: redis-py 8's default pool raises "
        "MaxConnectionsError at 1,000 reads in flight. RedisTier uses its own bounded pool (32)."
    )

    s.probes["loader calls during the tiercache runs (should be 0)"] = lambda: loads[0]

    async def shutdown() -> None:
        await raw.delete(*raw_keys)
        await raw.aclose()
        await wide.aclose()
        await cache.aclose()

    s.closers = [lp.close, lambda: lp.run(shutdown())]
    return s


def has_get_many_cached() -> bool:
    return hasattr(TieredCache, "get_many_cached")


def get_many(server: OwnRedis) -> Scenario:
    """``get_many_cached`` of 100 keys all in Redis, beside one raw MGET and 100 concurrent get_cached."""
    import redis.asyncio
    from aiocache import RedisCache
    from cashews import Cache

    s = Scenario(f"get_many of {MANY} keys, all in L2 (µs per key)")
    lp = _Loop()
    prefix = "m-" + uuid.uuid4().hex[:6]
    raw = redis.asyncio.Redis.from_url(server.url, protocol=2)
    cache = _redis_only(server.url, prefix)
    cashews_redis = Cache()
    cashews_redis.setup(server.url, suppress=False)
    aio = RedisCache(endpoint="127.0.0.1", port=server.port, namespace=prefix + "aio")
    keys = [f"k{i}" for i in range(MANY)]
    raw_keys = [f"{prefix}:raw:{k}" for k in keys]
    cashews_keys = [f"{prefix}:cashews:{k}" for k in keys]

    def load_many(missing: Any) -> dict[str, Any]:
        raise AssertionError(f"the loader must not run: {len(list(missing))} keys missing")

    async def fill() -> None:
        await raw.mset({k: orjson.dumps(VALUE) for k in raw_keys})
        for k in keys:
            await cache.set(k, VALUE)
        await cashews_redis.set_many({k: VALUE for k in cashews_keys}, expire=3600)
        await aio.multi_set([(k, VALUE) for k in keys], ttl=3600)

    lp.run(fill())

    async def raw_mget() -> Any:
        return [orjson.loads(v) for v in await raw.mget(raw_keys)]

    async def tc_many() -> Any:
        return await cache.get_many_cached(keys, load_many)  # type: ignore[attr-defined]

    async def tc_gather() -> Any:
        return await asyncio.gather(*(cache.get_cached(k, _never) for k in keys))

    async def cashews_many() -> Any:
        return await cashews_redis.get_many(*cashews_keys)

    async def aio_many() -> Any:
        return await aio.multi_get(keys)

    fns: dict[str, Callable[[], Awaitable[Any]]] = {
        "raw MGET + orjson.loads": raw_mget,
        "tiercache get_many_cached": tc_many,
        "tiercache get_cached x100 (gather)": tc_gather,
        "cashews get_many redis://": cashews_many,
        "aiocache multi_get RedisCache": aio_many,
    }
    s.cases = {name: Case(lp.batch(fn, 1), MANY) for name, fn in fns.items()}
    s.groups = GROUPS["get_many"]

    def round_trips() -> dict[str, int]:
        server.reset_stats()
        calls = 5
        for _ in range(calls):
            lp.run(tc_many())
        counts = server.commands()
        return {k: round(v / calls) for k, v in counts.items()}

    s.probes["Redis commands per get_many_cached of 100"] = round_trips

    async def shutdown() -> None:
        await raw.aclose()
        await cache.aclose()
        await cashews_redis.close()
        await aio.close()

    s.closers = [lp.close, lambda: lp.run(shutdown())]
    return s


# --- stampede: counts, not times ---------------------------------------------------------------------


@dataclass
class StampedeResult:
    """What N concurrent callers of one cold key cost."""

    name: str
    loader_calls: int
    commands: dict[str, int]
    seconds: float
    errors: int

    @property
    def total_commands(self) -> int:
        return sum(self.commands.values())


def stampede(server: OwnRedis, callers: int = STAMPEDE_CALLERS) -> list[StampedeResult]:
    """``callers`` tasks ask for one cold key whose loader takes 50 ms; count loads and Redis commands."""
    from aiocache import RedisCache, cached_stampede
    from aiocache import cached as aio_cached
    from cashews import Cache

    results: list[StampedeResult] = []
    lp = _Loop()
    prefix = "s-" + uuid.uuid4().hex[:6]

    def contender(
        name: str,
        make: Callable[[Callable[[], Awaitable[Any]]], Callable[[], Awaitable[Any]]],
        close: Callable[[], Awaitable[Any]],
    ) -> None:
        calls = [0]

        async def slow() -> Any:
            calls[0] += 1
            await asyncio.sleep(STAMPEDE_LOAD)
            return VALUE

        fn = make(slow)

        async def herd() -> list[Any]:
            return await asyncio.gather(*(fn() for _ in range(callers)), return_exceptions=True)

        lp.run(asyncio.sleep(0))
        server.reset_stats()
        started = time.perf_counter()
        out = lp.run(herd())
        elapsed = time.perf_counter() - started
        commands = server.commands()
        lp.run(close())
        errors = sum(1 for r in out if isinstance(r, BaseException))
        results.append(StampedeResult(name, calls[0], commands, elapsed, errors))

    def tiercache_make(two_tiers: bool) -> Callable[..., Any]:
        def make(slow: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
            tier = RedisTier(url=server.url, prefix=prefix + ("t2" if two_tiers else "t1"), **TIER_OPTIONS)
            tiers: list[Any] = [MemoryTier(max_entries=1000), tier] if two_tiers else [tier]
            cache = TieredCache(tiers, ttl=60, namespace="bench")
            holder.append(cache)
            return functools.partial(cache.get_cached, "cold", slow)

        return make

    holder: list[TieredCache] = []

    async def close_tc() -> None:
        await holder.pop().aclose()

    contender("tiercache get_cached (Memory + Redis)", tiercache_make(True), close_tc)
    contender("tiercache get_cached (Redis only)", tiercache_make(False), close_tc)

    peers: list[Any] = []

    def cashews_make(lock: bool) -> Callable[..., Any]:
        def make(slow: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
            c = Cache()
            c.setup(server.url, suppress=False)
            peers.append(c)
            return c(ttl=60, lock=lock, prefix=f"{prefix}cashews{int(lock)}")(slow)  # type: ignore[no-any-return]

        return make

    def aiocache_make(stampede_lock: bool) -> Callable[..., Any]:
        def make(slow: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
            options = {
                "ttl": 60,
                "cache": RedisCache,
                "endpoint": "127.0.0.1",
                "port": server.port,
                "namespace": f"{prefix}aio{int(stampede_lock)}",
            }
            deco = cached_stampede(lease=2, **options) if stampede_lock else aio_cached(**options)
            fn = deco(slow)
            peers.append(fn.cache)
            return fn  # type: ignore[no-any-return]

        return make

    async def close_peer() -> None:
        await peers.pop().close()

    contender("cashews @cache(ttl, lock=True) redis://", cashews_make(True), close_peer)
    contender("cashews @cache(ttl) redis://", cashews_make(False), close_peer)
    contender("aiocache @cached_stampede RedisCache", aiocache_make(True), close_peer)
    contender("aiocache @cached RedisCache", aiocache_make(False), close_peer)
    lp.close()
    return results


# --- import time ---------------------------------------------------------------------------------------


def import_times(reps: int = 15) -> dict[str, float]:
    """Median self+cumulative ``-X importtime`` of the top-level import, in µs, in fresh interpreters.

    Also the wall time of ``python -c "import X"`` minus ``python -c pass`` (interleaved runs).
    """
    cumulative: dict[str, list[float]] = {"tiercache": [], "json": []}
    wall: dict[str, list[float]] = {"tiercache": [], "json": [], "pass": []}
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="")
    for _ in range(reps):
        for mod in ("tiercache", "json"):
            out = subprocess.run(
                [sys.executable, "-X", "importtime", "-c", f"import {mod}"],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            ).stderr
            for line in out.splitlines():
                parts = [p.strip() for p in line.split("|")]
                if len(parts) == 3 and parts[2] == mod:
                    cumulative[mod].append(float(parts[1]))
        for mod in ("tiercache", "json", "pass"):
            code = "pass" if mod == "pass" else f"import {mod}"
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            wall[mod].append(time.perf_counter() - started)
    med = {f"importtime {k} (µs)": statistics.median(v) for k, v in cumulative.items()}
    base = statistics.median(wall["pass"])
    for k in ("tiercache", "json"):
        med[f"wall {k} minus startup (ms)"] = (statistics.median(wall[k]) - base) * 1e3
    med["interpreter startup (ms)"] = base * 1e3
    return med


@contextlib.contextmanager
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    try:
        yield server
    finally:
        server.stop()
