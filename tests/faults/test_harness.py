"""The harness itself: the checker catches wrong and superseded values, the proxy's faults are real."""

from __future__ import annotations

import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults.harness import FaultProxy, FaultSchedule, History, Step, percentile
from tests.faults.test_soak import STALE_TTL, TTL, run_load
from tests.redis_servers import RedisServer
from tiercache import Entry, TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeRemoteTier


def test_checker_accepts_a_clean_history_and_flags_each_kind_of_wrong_value() -> None:
    h = History(["remote"])
    t = time.time()
    v1 = h.produce("a", "set")
    h.record_write("a", "set", v1["s"], t, [])
    h.record_read("a", t + 0.01, v1, [])
    assert h.check(ttl=1, stale_ttl=0, delay=0).wrong == []

    h.record_read("a", t, {"k": "b", "s": v1["s"]}, [])  # another key's value
    h.record_read("a", t, {"k": "a", "s": 10**9}, [])  # a value nobody produced
    h.record_read("a", t, "garbage", [])
    assert len(h.check(ttl=1, stale_ttl=0, delay=0).wrong) == 3

    old = History(["remote"])
    v = old.produce("a", "load")
    old.produced[("a", v["s"])].start -= 5  # produced 5 s ago
    old.record_read("a", time.time(), v, [])
    assert len(old.check(ttl=1, stale_ttl=0, delay=0).wrong) == 1  # older than ttl
    assert old.check(ttl=1, stale_ttl=10, delay=0).wrong != []  # not served stale: ttl applies
    old.reads[0].stale_served = True
    assert old.check(ttl=1, stale_ttl=10, delay=0).wrong == []


def test_checker_flags_a_value_older_than_a_durable_write_but_not_one_that_failed() -> None:
    h = History(["remote"])
    before = h.produce("a", "load")
    time.sleep(0.1)
    t = time.time()
    h.record_write("a", "delete", None, t, [])  # durable: no tier error during the call
    time.sleep(0.1)
    h.record_read("a", time.time(), before, [])
    assert len(h.check(ttl=5, stale_ttl=0, delay=0.05).superseded) == 1
    assert h.check(ttl=5, stale_ttl=0, delay=1.0).superseded == []  # within the allowed delay
    h.writes[0].durable = False  # the remote tier failed: the old copy may legitimately remain
    assert h.check(ttl=5, stale_ttl=0, delay=0.05).superseded == []


class ForgetfulDeletes(FakeRemoteTier):
    """A broken tier: acknowledges deletes without deleting."""

    def delete(self, key: str, version: int) -> None:
        self.calls["delete"] += 1


class InventsValues(FakeRemoteTier):
    """A broken tier: stores something other than what it was given."""

    def set(self, key: str, entry: Entry) -> None:
        forged = dict(entry.value)
        forged["s"] += 10**9
        super().set(key, entry.replace(value=forged))


@pytest.mark.parametrize(
    ("tier", "finding"),
    [(ForgetfulDeletes, "superseded"), (InventsValues, "wrong")],
    ids=["deletes", "values"],
)
def test_the_soak_checker_catches_a_broken_tier(tier: type[FakeRemoteTier], finding: str) -> None:
    history = History(["remote"])
    cache = TieredCache(
        [MemoryTier(max_entries=4), tier()],  # a tiny L1: most reads reach the broken tier
        ttl=TTL,
        stale_ttl=STALE_TTL,
        namespace="broken",
        on_event=history.on_event,
    )
    run_load(cache, history, 1.5, seed=3)
    verdict = history.check(ttl=TTL, stale_ttl=STALE_TTL, delay=0.05)
    assert history.errors == []
    assert len(getattr(verdict, finding)) > 0, f"the checker missed a broken tier ({finding})"


def test_proxy_faults_are_what_they_claim(redis_server: RedisServer) -> None:
    proxy = FaultProxy(redis_server.port)
    client = redis.Redis(
        port=proxy.port, socket_timeout=0.3, socket_connect_timeout=0.3, retry=Retry(NoBackoff(), 0)
    )
    try:
        assert client.ping()
        proxy.set_mode("delay", 0.05)
        started = time.monotonic()
        client.ping()
        assert time.monotonic() - started >= 0.09  # both directions delayed
        proxy.set_mode("stall")
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 1.0
        proxy.set_mode("pass")
        client.connection_pool.disconnect()
        assert client.ping()
        proxy.reset()
        with pytest.raises(redis.ConnectionError):
            client.ping()  # the pooled connection was aborted (RST)
        assert client.ping()  # a new one works
        proxy.set_mode("drop")
        with pytest.raises(redis.ConnectionError):
            client.ping()
        proxy.set_mode("pass")
        assert client.ping()
    finally:
        client.close()
        proxy.close()


def test_schedule_is_bounded_and_undoes_every_fault() -> None:
    state = {"on": 0, "off": 0}
    schedule = FaultSchedule(
        [
            Step(
                0.0,
                "short",
                lambda: state.__setitem__("on", state["on"] + 1),
                0.05,
                lambda: state.__setitem__("off", state["off"] + 1),
            ),
            Step(
                0.1,
                "cut short",
                lambda: state.__setitem__("on", state["on"] + 1),
                60.0,
                lambda: state.__setitem__("off", state["off"] + 1),
            ),
            Step(99.0, "past the deadline", lambda: state.__setitem__("on", 99)),
        ],
        deadline=0.5,
    )
    started = time.monotonic()
    schedule.start()
    time.sleep(0.3)
    schedule.stop()
    assert time.monotonic() - started < 2.0
    assert state == {"on": 2, "off": 2}
    assert [w.name for w in schedule.windows] == ["short", "cut short"]


def test_percentile() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(101)], 0.99) == 99.0
