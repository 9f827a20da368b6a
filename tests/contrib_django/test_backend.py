"""TieredCacheBackend beyond Django's suite: signing, timeouts, cross-process atomicity and
coherence, namespace-only clear, bad settings, Redis down. Real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

django = pytest.importorskip("django")  # the dev extra pins it; test_django_suite fails loudly without
redis = pytest.importorskip("redis")

from django.core.exceptions import ImproperlyConfigured  # noqa: E402

from tiercache import TierError  # noqa: E402
from tiercache.contrib.django import TieredCacheBackend  # noqa: E402

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]
KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def _config(url: str, namespace: str, **options: Any) -> dict[str, Any]:
    opts = {"NAMESPACE": namespace, "SIGNING_KEYS": [KEY.decode()], **options}
    return {"LOCATION": url, "OPTIONS": opts}


def _backend(config: dict[str, Any], **params: Any) -> TieredCacheBackend:
    return TieredCacheBackend(config["LOCATION"], {**config, **params})


@pytest.fixture
def namespace() -> str:
    return f"djt{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(shared_redis_url: str) -> Iterator[Any]:
    c = redis.Redis.from_url(shared_redis_url)
    yield c
    c.close()


@pytest.fixture
def config(shared_redis_url: str, namespace: str, client: Any) -> Iterator[dict[str, Any]]:
    cfg = _config(shared_redis_url, namespace)
    yield cfg
    for name in client.scan_iter(match=f"*{namespace}*", count=1000):
        client.delete(name)


def _value_key(client: Any, namespace: str, suffix: str) -> bytes:
    names = [
        n for n in client.scan_iter(match=f"*{namespace}*", count=1000) if n.endswith(suffix.encode() + b"}")
    ]
    assert len(names) == 1, names
    return names[0]


def _run_worker(config: dict[str, Any], *args: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.contrib_django.worker", json.dumps(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_redis_holds_only_signed_records_and_tampering_is_a_miss(config: dict[str, Any], client: Any) -> None:
    cache = _backend(config)
    cache.set("doc", {"a": [1, 2]}, 60)
    name = _value_key(client, config["OPTIONS"]["NAMESPACE"], ":1:doc")
    record = client.get(name)
    assert record[:4] == b"tc1v" and record[24:].startswith(b'{"tcs":1,"kid":"')
    assert b'"fmt":"p"' in record[:140]  # a pickle, but only behind the signature

    fresh = _backend(config, OPTIONS={**config["OPTIONS"], "L1_MAX_ENTRIES": 11})  # its own L1
    assert fresh.get("doc") == {"a": [1, 2]}
    body_at = record.index(b'"body":"') + 20
    tampered = record[:body_at] + bytes([record[body_at] ^ 1]) + record[body_at + 1 :]
    client.set(name, tampered, keepttl=True)
    other = _backend(config, OPTIONS={**config["OPTIONS"], "L1_MAX_ENTRIES": 12})
    assert other.get("doc", "missing") == "missing"
    assert other.has_key("doc") is False
    with pytest.raises(ValueError):
        other.incr("doc")
    # A record signed with a key the reader does not hold is a miss too.
    cache.set("signed", 1, 60)
    stranger = _backend(config, OPTIONS={**config["OPTIONS"], "SIGNING_KEYS": [OTHER_KEY]})
    assert stranger.get("signed") is None
    assert stranger.add("signed", 2) is True  # unreadable counts as absent: add replaces it


def test_get_returns_a_fresh_copy(config: dict[str, Any]) -> None:
    cache = _backend(config)
    cache.set("list", [1, 2], 60)
    got = cache.get("list")
    got.append(3)
    assert cache.get("list") == [1, 2]
    assert asyncio.run(cache.aget("list")) == [1, 2]


def test_timeouts_none_zero_negative_and_default(config: dict[str, Any], client: Any) -> None:
    ns = config["OPTIONS"]["NAMESPACE"]
    cache = _backend(config, TIMEOUT=None)  # the alias default: forever
    cache.set("forever", 1)
    assert client.pttl(_value_key(client, ns, ":1:forever")) > 50 * 365 * 86400 * 1000
    cache.set("sixty", 1, 60)
    assert 55_000 < client.pttl(_value_key(client, ns, ":1:sixty")) <= 60_000
    cache.set("gone", 1, 60)
    cache.set("gone", 2, 0)  # Django: 0 means "do not cache"; the old value goes too
    assert cache.get("gone") is None
    assert cache.add("zero", 1, 0) is True and cache.get("zero") is None
    cache.set("neg", 1, 60)
    assert cache.touch("neg", -1) is True and cache.get("neg") is None
    assert cache.touch("neg", 10) is False
    cache.set("short", 1, 60)
    assert cache.touch("short", 2) is True
    assert 1_000 < client.pttl(_value_key(client, ns, ":1:short")) <= 2_000


def _start_at() -> str:
    return repr(time.time() + 1.5)  # the workers' imports finish before it; then they all start


def test_add_has_exactly_one_winner_across_processes(config: dict[str, Any]) -> None:
    n, workers = 200, 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.contrib_django.worker", json.dumps(config), "add", start, str(n)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for start in [_start_at()] * workers
    ]
    won: list[int] = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        won += json.loads(out)
    assert sorted(won) == list(range(n))  # every key added exactly once


def test_incr_loses_no_update_across_processes(config: dict[str, Any]) -> None:
    cache = _backend(config)
    cache.set("counter", 0, 300)
    per_worker, workers = 60, 4
    start = _start_at()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.contrib_django.worker",
                json.dumps(config),
                "incr",
                start,
                str(per_worker),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(workers)
    ]
    seen: list[int] = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        seen += json.loads(out)
    assert sorted(seen) == list(range(1, per_worker * workers + 1))  # each result handed out once
    assert cache.get("counter") == per_worker * workers


def _bus_settled(cache: TieredCacheBackend) -> None:
    """Start the cache's bus and wait until its first subscription has emptied L1 (on_reset),
    so that what a test puts in L1 afterwards stays there. (The bus reports ready slightly before
    it runs the resets, hence the counter.)"""
    cache.has_key("-")
    coherence = cache.tiered._rt.coherence
    assert coherence.bus is not None and coherence.bus.wait_ready(5)
    assert _eventually(lambda: coherence._resets >= 1)


def _eventually(check: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return bool(check())


def test_other_processes_writes_reach_this_l1(config: dict[str, Any]) -> None:
    cache = _backend(config)
    _bus_settled(cache)
    cache.set("shared", "old", 300)
    cache.set("n", 1, 300)
    assert cache.tiered.sync.get(":1:shared") == cache._dumps("old")  # now in this process's L1
    hits_before = cache.tiered.tiers[0].hit_count()
    assert cache.get("shared") == "old" and cache.tiered.tiers[0].hit_count() > hits_before
    _run_worker(config, "set", "0", "shared", json.dumps("new"))
    assert _eventually(lambda: cache.get("shared") == "new")
    assert _run_worker(config, "incr1", "0", "n") == 2  # a compare-and-set write announces too
    assert _eventually(lambda: cache.get("n") == 2)


def test_clear_removes_only_its_namespace(shared_redis_url: str, config: dict[str, Any], client: Any) -> None:
    other_ns = f"djt{uuid.uuid4().hex[:12]}"
    mine, theirs = _backend(config), _backend(_config(shared_redis_url, other_ns))
    foreign = f"not-tiercache-{other_ns}"
    try:
        mine.set("a", 1, 60)
        theirs.set("a", 2, 60)
        client.set(foreign, b"x", ex=60)
        mine.clear()
        assert mine.get("a") is None
        assert theirs.get("a") == 2
        assert client.get(foreign) == b"x"
    finally:
        theirs.clear()
        client.delete(foreign)


def test_async_methods(config: dict[str, Any]) -> None:
    cache = _backend(config)

    async def scenario() -> None:
        assert await cache.aadd("a", 1, 60) is True
        assert await cache.aadd("a", 2, 60) is False
        assert await cache.aincr("a", 5) == 6
        assert await cache.adecr("a") == 5
        await cache.aset_many({"b": "x", "c": None}, 60)
        assert await cache.aget_many(["a", "b", "c", "zz"]) == {"a": 5, "b": "x", "c": None}
        assert await cache.ahas_key("c") is True
        assert await cache.atouch("b", 30) is True
        assert await cache.adelete("b") is True and await cache.adelete("b") is False
        await cache.adelete_many(["a", "c"])
        assert await cache.aget_or_set("d", lambda: "made", 60) == "made"
        await cache.aclear()
        assert await cache.aget("d") is None

    asyncio.run(scenario())
    asyncio.run(scenario())  # a second event loop (as Lambda handlers or async_to_sync make)


@pytest.mark.parametrize(
    ("location", "options", "message"),
    [
        ("redis://127.0.0.1:6379/0", {"MAX_ENTRIES": 30}, "MAX_ENTRIES/CULL_FREQUENCY do not apply"),
        ("redis://127.0.0.1:6379/0", {"L1_SIZE": 3}, "unknown OPTIONS ['L1_SIZE']"),
        ("redis://127.0.0.1:6379/0", {"NAMESPACE": "a:b"}, "NAMESPACE"),
        (None, {}, "LOCATION must be a Redis URL"),
        (["redis://a", "redis://b"], {}, "LOCATION is one Redis URL"),
    ],
)
def test_bad_settings_are_clear_errors(location: Any, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=re.escape(message)):
        TieredCacheBackend(location, {"OPTIONS": options})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"SIGNING_KEYS": ["short"]}, "at least 16 bytes"),
        ({"SIGNING_KEYS": "one string"}, "must be a list of keys"),
        ({"REDIS": {"socket_timeout": -1}}, "timeouts must be positive"),
        ({"REDIS": {"no_such_option": 1}}, "no_such_option"),
        ({"CACHE": {"namespace": "x"}}, "namespace"),
        ({"L1_MAX_ENTRIES": 0}, "max_entries must be at least 1"),
    ],
)
def test_bad_options_fail_when_the_cache_is_built(
    config: dict[str, Any], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ImproperlyConfigured, match=re.escape(message)):
        _backend(config, OPTIONS={**config["OPTIONS"], **options})


def test_redis_down_reads_miss_writes_skip_atomics_raise(namespace: str) -> None:
    config = _config("redis://127.0.0.1:1/0", namespace, BUS=False)
    cache = _backend(config)
    assert cache.get("a", "default") == "default"
    cache.set("a", 1, 60)  # counted as a skipped write, not raised
    assert cache.get_many(["b"]) == {}
    with pytest.raises(TierError, match="needs Redis"):
        cache.add("a", 2)
    with pytest.raises(TierError, match="needs Redis"):
        cache.incr("a")


def test_docs_settings_example_runs(shared_redis_url: str, namespace: str) -> None:
    """The two Python blocks of docs/django.md, in a fresh process, plus SECRET_KEY rotation."""
    page = (ROOT / "docs" / "django.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    settings_block, usage_block = blocks[0], blocks[1]
    script = textwrap.dedent(
        """
        import sys, django
        from django.conf import settings
        ns = {}
        exec(sys.argv[1], ns)
        ns["CACHES"]["default"]["OPTIONS"]["NAMESPACE"] = sys.argv[3]
        names = {k: v for k, v in ns.items() if k.isupper()}
        settings.configure(**names)
        django.setup()
        exec(sys.argv[2], {})
        from django.core.cache import cache
        assert cache.get("greeting") == {"text": "hello"}
        # Rotation: a new SECRET_KEY reads old records only through SECRET_KEY_FALLBACKS.
        from tiercache.contrib.django import TieredCacheBackend
        params = dict(settings.CACHES["default"])
        params["OPTIONS"] = dict(params["OPTIONS"], L1_MAX_ENTRIES=7)
        old_secret = settings.SECRET_KEY
        settings.SECRET_KEY = "another long random secret value"
        assert TieredCacheBackend(params["LOCATION"], params).get("greeting") is None
        settings.SECRET_KEY_FALLBACKS = [old_secret]
        params["OPTIONS"]["L1_MAX_ENTRIES"] = 8
        assert TieredCacheBackend(params["LOCATION"], params).get("greeting") == {"text": "hello"}
        cache.clear()
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, settings_block, usage_block, namespace],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert "redis://127.0.0.1:6379/0" in settings_block and shared_redis_url.startswith(
        "redis://127.0.0.1:6379"
    )


def test_redis_cluster(redis_cluster: Any, namespace: str) -> None:
    """The compare-and-set, the bus and clear on a real 3-master Redis Cluster."""
    config = _config(redis_cluster.url, namespace)
    cache = _backend(config)
    try:
        keys = [f"k{i}" for i in range(20)]  # spread over the slots
        for key in keys:
            assert cache.add(key, 1, 60) is True
            assert cache.add(key, 2, 60) is False
            assert cache.incr(key, 2) == 3
        assert cache.get_many(keys) == dict.fromkeys(keys, 3)
        assert asyncio.run(cache.aincr("k0")) == 4
        other = _backend(config, OPTIONS={**config["OPTIONS"], "L1_MAX_ENTRIES": 13})
        assert other.get("k0") == 4
        cache.clear()
        assert cache.get_many(keys) == {}
        assert _eventually(lambda: other.get_many(keys) == {})  # its L1 copy goes with the bus message
    finally:
        cache.clear()


def test_a_lost_reply_is_not_retried(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The script ran but its reply was lost (a timeout): incr raises and is applied once, never twice."""
    import tiercache.contrib.django as contrib

    cache = _backend(config)
    cache.set("n", 10, 60)
    real = contrib.compare_and_set

    def applied_then_timed_out(*args: Any) -> bool:
        real(*args)
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(contrib, "compare_and_set", applied_then_timed_out)
    with pytest.raises(TierError, match="needs Redis"):
        cache.incr("n")
    monkeypatch.setattr(contrib, "compare_and_set", real)
    assert cache.get("n") == 11  # and this process's L1 copy (10) was dropped all the same

    areal = contrib.acompare_and_set

    async def aapplied_then_timed_out(*args: Any) -> bool:
        await areal(*args)
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(contrib, "acompare_and_set", aapplied_then_timed_out)
    with pytest.raises(TierError, match="needs Redis"):
        asyncio.run(cache.aincr("n"))
    monkeypatch.setattr(contrib, "acompare_and_set", areal)
    assert cache.get("n") == 12


def test_one_tiered_cache_per_process_and_close_keeps_it(config: dict[str, Any]) -> None:
    import threading

    first = _backend(config)
    seen: list[Any] = []
    thread = threading.Thread(target=lambda: seen.append(_backend(config).tiered))
    thread.start()
    thread.join()
    assert seen == [first.tiered]  # Django's per-thread backend objects share one L1 and pool
    assert _backend(config, OPTIONS={**config["OPTIONS"], "L1_MAX_ENTRIES": 5}).tiered is not first.tiered
    first.set("a", 1, 60)
    first.close()  # Django calls it after every request
    asyncio.run(first.aclose())
    assert first.get("a") == 1 and first.incr("a") == 2


def test_round_trips_per_call_match_the_docs(redis_server: Any, namespace: str) -> None:
    """The "Cost per call" table of docs/django.md, counted by the server (INFO commandstats)."""
    cache = _backend(_config(redis_server.url, namespace))
    counted = ("get", "mget", "eval", "evalsha", "publish")

    def trips(call: Any) -> int:
        redis_server.reset_stats()
        call()
        stats = redis_server.commandstats()
        return sum(stats.get(name, 0) for name in counted)

    cache.set("warm", 1, 60)  # scripts cached on the server, the bus subscribed
    cache.add("warm2", 1, 60)
    assert trips(lambda: cache.set("a", 1, 60)) == 2
    # Reads only, and no bus: its first subscription would empty L1 at a moment of its choosing.
    fresh_options = {
        "NAMESPACE": namespace,
        "L1_MAX_ENTRIES": 9,
        "SIGNING_KEYS": [KEY.decode()],
        "BUS": False,
    }
    fresh = _backend(_config(redis_server.url, namespace), OPTIONS=fresh_options)
    assert trips(lambda: fresh.get("a")) == 1  # L1 miss
    assert trips(lambda: fresh.get("a")) == 0  # L1 hit
    assert trips(lambda: fresh.get_many(["b", "c", "d"])) == 1
    assert trips(lambda: cache.add("n", 1, 60)) == 3
    assert trips(lambda: cache.incr("n")) == 3
    assert trips(lambda: cache.touch("n", 30)) == 3
    assert trips(lambda: cache.delete("n")) == 3
    page = (ROOT / "docs" / "django.md").read_text()
    for row in (
        "| `get`, `has_key` (L1 miss) | 1 (`GET`) |",
        "| `get_many` (L1 misses) | 1 (`MGET`) |",
        "| `set` | 2 (",
        "| `delete` | 3 (",
        "| `add`, `incr`, `decr`, `touch` | 3 (",
    ):
        assert row in page, row


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_drops_the_l1_it_inherited(config: dict[str, Any]) -> None:
    """gunicorn --preload style: the backend was used before fork(); the child must not serve the
    parent's L1 copies forever (its bus subscriber restarts and clears them)."""
    cache = _backend(config)
    _bus_settled(cache)
    cache.set("a", 1, 60)
    assert cache.get("a") == 1
    quiet = _backend(config, OPTIONS={**config["OPTIONS"], "BUS": False, "L1_MAX_ENTRIES": 14})
    quiet.set("a", 2, 60)  # reaches Redis, but no bus message: the parent's L1 still says 1
    assert cache.get("a") == 1
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it reads, exit without running pytest's teardown
        signal.alarm(20)  # never outlive the test, even if something deadlocked across fork()
        try:
            ok = _eventually(lambda: cache.get("a") == 2, timeout=5.0)
            os.write(write_end, b"2" if ok else repr(cache.get("a")).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 25)
    answer = os.read(read_end, 100) if ready else b"(no answer: the child hung)"
    os.close(read_end)
    os.waitpid(pid, 0)
    assert answer == b"2"


def test_get_or_set_calls_the_default_once_across_processes(config: dict[str, Any], client: Any) -> None:
    """3 processes x 4 threads ask for one missing key: the slow default runs once (in-process
    single flight plus the Redis lease), and everyone gets its value."""
    calls = f"calls-{config['OPTIONS']['NAMESPACE']}"
    start = _start_at()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.contrib_django.worker",
                json.dumps(config),
                "get_or_set",
                start,
                calls,
                "4",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(3)
    ]
    results: list[str] = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        results += json.loads(out)
    try:
        assert int(client.get(calls)) == 1
    finally:
        client.delete(calls)
    assert len(results) == 12 and len(set(results)) == 1 and results[0].startswith("computed by ")
    assert _backend(config).get("expensive") == results[0]


def test_get_or_set_errors_and_zero_timeout(config: dict[str, Any]) -> None:
    import pickle

    cache = _backend(config)

    def boom() -> None:
        raise KeyError("nope")

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise pickle.PickleError("no")

    with pytest.raises(KeyError):
        cache.get_or_set("x", boom)
    with pytest.raises(KeyError):
        asyncio.run(cache.aget_or_set("x", boom))
    assert cache.get("x", "absent") == "absent"  # a failing default is not cached
    with pytest.raises(pickle.PickleError):
        cache.get_or_set("u", Unpicklable())
    assert cache.get_or_set("t", 5, timeout=0) == 5 and cache.get("t") is None
    assert asyncio.run(cache.aget_or_set("t", lambda: 6, timeout=0)) == 6 and cache.get("t") is None
