"""Secrets stay out of repr, logs, events and errors through network faults; namespaces isolate tenants."""

from __future__ import annotations

import asyncio
import functools
import logging
import subprocess
import time
import traceback
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.faults.harness import FaultProxy
from tests.kv_fake import ACCOUNT_ID, NAMESPACE_ID, FakeKV
from tests.redis_servers import HOST, REDIS_SERVER, RedisServer, purge_prefix
from tiercache import Event, TieredCache
from tiercache.adapters.cloudflare_kv import CloudflareKVTier
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier
from tiercache.signing import SignedCodec

pytestmark = pytest.mark.redis

PASSWORD = "pw-" + uuid.uuid4().hex
TOKEN = "tok-" + uuid.uuid4().hex
SIGNING_KEY = ("sk-" + uuid.uuid4().hex).encode()


@pytest.fixture
def secured_redis() -> Iterator[RedisServer]:
    server = start_with_auth(RedisServer(extra=["--requirepass", PASSWORD]))
    try:
        yield server
    finally:
        server.cleanup()


def start_with_auth(self: RedisServer) -> RedisServer:
    """RedisServer.start waits for an unauthenticated PONG; with requirepass it gets -NOAUTH."""
    args = [REDIS_SERVER, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    args += ["--dir", self.dir, *self.extra]
    self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=self.port, password=PASSWORD, socket_timeout=0.2, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 5
    try:
        while True:
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server with requirepass did not start") from None
                time.sleep(0.02)
    finally:
        client.close()


def everything_said(
    caplog: pytest.LogCaptureFixture, events: list[Event], errors: list[BaseException]
) -> str:
    parts = [caplog.text]
    parts += [r.getMessage() for r in caplog.records]
    parts += [repr(e) for e in events]
    parts += [f"{e.error!s} {e.error!r}" for e in events if e.error is not None]
    for exc in errors + [e.error for e in events if e.error is not None]:
        parts.append("".join(traceback.format_exception(exc)))  # chained causes included
    return "\n".join(parts)


def test_redis_password_never_leaks_through_faults(
    secured_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger: tiercache.*, redis, asyncio
    proxy = FaultProxy(secured_redis.port)
    events: list[Event] = []
    errors: list[BaseException] = []
    good = RedisTier(url=f"redis://:{PASSWORD}@127.0.0.1:{proxy.port}/0", prefix="sec")
    wrong = RedisTier(url=f"redis://user:{PASSWORD}x@127.0.0.1:{secured_redis.port}/0", prefix="sec")
    caches = [
        TieredCache(
            [MemoryTier(), t],
            namespace="sec",
            breaker_threshold=2,
            breaker_cooldown=0.05,
            on_event=events.append,
        )
        for t in (good, wrong)
    ]

    def exercise(tag: str) -> None:
        for cache in caches:
            for i in range(4):
                try:
                    cache.sync.get_cached(f"{tag}{i}", functools.partial(int, i))
                    cache.sync.set(f"{tag}s{i}", i)
                    cache.sync.delete(f"{tag}s{i}")
                except Exception as exc:
                    errors.append(exc)

            async def run(cache: TieredCache = cache) -> None:
                try:
                    await cache.get_cached(f"{tag}a", lambda: 1)
                    await cache.set(f"{tag}b", 2)
                except Exception as exc:
                    errors.append(exc)

            asyncio.run(run())  # (no aclose() per run: a closed cache refuses further calls)

    try:
        exercise("pass")
        proxy.set_mode("stall")
        exercise("stall")
        proxy.set_mode("pass")
        proxy.reset()
        exercise("reset")
        proxy.set_mode("drop")
        exercise("drop")
        proxy.set_mode("pass")
        secured_redis.kill()
        exercise("down")
    finally:
        proxy.close()
        for cache in caches:
            cache.sync.close()
    said = everything_said(caplog, events, errors)
    said += "\n".join(repr(x) for x in (good, wrong, *caches, *(c.stats.snapshot() for c in caches)))
    assert errors == []
    assert any(e.kind == "tier_error" for e in events)  # the faults really happened
    assert PASSWORD not in said
    assert f"127.0.0.1:{proxy.port}" in said  # the searched text does name the server (redacted)


def test_cloudflare_token_and_signing_keys_never_leak(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    events: list[Event] = []
    errors: list[BaseException] = []
    codec = SignedCodec([SIGNING_KEY])
    with FakeKV(
        token=TOKEN, fault_rate=1.0, faults=("429", "500", "timeout"), timeout_delay=0.2, seed=3
    ) as fake:
        kv = CloudflareKVTier(
            account_id=ACCOUNT_ID,
            namespace_id=NAMESPACE_ID,
            api_token=TOKEN,
            base_url=fake.base_url,
            timeout=0.1,
            deadline=0.3,
            backoff=0.01,
            default_retry_after=0.05,
            max_retry_after=0.1,
        )
        cache = TieredCache(
            [MemoryTier(), kv], namespace="sec", codec=codec, breaker_cooldown=0.05, on_event=events.append
        )
        for i in range(6):
            try:
                cache.sync.get_cached(f"k{i}", functools.partial(int, i))
                cache.sync.set(f"s{i}", i)
            except Exception as exc:
                errors.append(exc)
        fake.set_faults(0.0)
        cache.sync.close()
        said = everything_said(caplog, events, errors) + repr(kv) + repr(cache) + repr(codec)
    assert errors == []
    assert any(e.kind == "tier_error" for e in events)
    assert TOKEN not in said
    assert SIGNING_KEY.decode() not in said


@pytest.fixture
def shared(shared_redis_url: str, redis_prefix: str) -> Iterator[tuple[str, str]]:
    yield shared_redis_url, redis_prefix
    purge_prefix(shared_redis_url, redis_prefix)


def test_namespaces_isolate_tenants_on_one_redis(shared: tuple[str, str]) -> None:
    url, prefix = shared
    raw = redis.Redis.from_url(url)
    outside = f"{prefix}-outside-{uuid.uuid4().hex}"  # not under our prefix at all
    foreign = f"{prefix}:foreign"  # under the prefix, not a tiercache key
    raw.set(outside, b"keep")
    raw.set(foreign, b"keep")

    def tenant(ns: str) -> TieredCache:
        return TieredCache([MemoryTier(), RedisTier(url=url, prefix=prefix)], namespace=ns)

    a, b = tenant("tenantA"), tenant("tenantB")
    a_again, b_again = tenant("tenantA"), tenant("tenantB")  # other processes: no shared L1
    try:
        for key in ("user:1", "user:2", "config"):
            a.sync.set(key, f"A-{key}", tags=("users",))
            b.sync.set(key, f"B-{key}", tags=("users",))
        assert a_again.sync.get("user:1") == "A-user:1" and b_again.sync.get("user:1") == "B-user:1"
        # A loader never runs in one tenant because the other holds the key.
        assert b_again.sync.get_cached("config", lambda: "loaded") == "B-config"
        assert a.sync.get_cached("only-a", lambda: "A") == "A"
        assert tenant("tenantB").sync.get("only-a") is None

        a.sync.delete("user:2")
        assert tenant("tenantB").sync.get("user:2") == "B-user:2"
        a.sync.invalidate_tags("users")
        assert tenant("tenantA").sync.get("user:1") is None
        assert tenant("tenantB").sync.get("user:1") == "B-user:1"  # tags are per namespace

        a.sync.clear()
        fresh_a, fresh_b = tenant("tenantA"), tenant("tenantB")
        assert fresh_a.sync.get("config") is None and fresh_a.sync.get("only-a") is None
        assert fresh_b.sync.get("config") == "B-config" and fresh_b.sync.get("user:2") == "B-user:2"
        assert raw.get(outside) == b"keep" and raw.get(foreign) == b"keep"
        # Namespaces cannot be forged through keys: a key with ':' stays inside its namespace.
        a.sync.set("tenantB:config", "forged")
        assert tenant("tenantB").sync.get("config") == "B-config"
    finally:
        for cache in (a, b, a_again, b_again):
            cache.sync.close()
        raw.delete(outside, foreign)
        raw.close()
