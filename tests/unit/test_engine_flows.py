"""The engine's flows driven by hand with send/throw: no tiers, no driver, every command checked."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from tiercache import TieredCache
from tiercache._engine import (
    NO_LEASE,
    AcquireLease,
    ClearAll,
    DeleteAll,
    ExpireAll,
    FillPlan,
    Join,
    Load,
    LoadMany,
    LoadOutcome,
    Outcome,
    Publish,
    Read,
    ReadMany,
    Refresh,
    ReleaseLease,
    Source,
    StoreTagTimes,
    WaitForEntry,
    Write,
    WriteMany,
    fill_flow,
    join_limit,
    load_timeouts,
    many_flow,
    ops,
)
from tiercache._engine.cached import cached_flow, lead_flow
from tiercache._entry import Entry
from tiercache._errors import ValueTooLargeError
from tiercache._flight import Flight, FlightAborted
from tiercache._policy import Policy
from tiercache.testing import FakeClock, FakeRemoteTier, make_entry

NOW = 1_000_000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=NOW)


def plan(clock: FakeClock, lease: int | None = 1) -> FillPlan:
    return FillPlan(names=("memory", "remote"), remote=(1,), lease=lease, write_order=(1, 0), clock=clock)


def build(key: str, value: Any, policy: Policy, loaded: LoadOutcome, version: int) -> Entry:
    return policy.new_entry(key, value, NOW, created_at=NOW, version=version)


def fill(
    clock: FakeClock, policy: Policy, stale: Entry | None = None, **kw: Any
) -> Generator[Any, Any, Outcome]:
    return fill_flow(plan(clock, **kw), "k", policy, stale=stale, version=7, fence=None, build=build)


def finish(gen: Generator[Any, Any, Any], send: Any) -> Any:
    with pytest.raises(StopIteration) as stop:
        gen.send(send)
    return stop.value.value


def test_a_cold_key_takes_the_lease_rereads_loads_writes_bottom_up_and_releases(clock: FakeClock) -> None:
    gen = fill(clock, Policy(ttl=60))
    assert next(gen) == Read(1, "k", None)
    assert gen.send(None) == AcquireLease(1, "k", 10.0)
    assert gen.send("tok") == Read(1, "k", None, count_miss=False)  # someone may have written just before
    load = gen.send(None)
    assert load == Load(None, None, lease=(1, "tok"))
    write = gen.send(LoadOutcome("v", started_at=NOW))
    assert isinstance(write, Write) and tuple(write.indices) == (1, 0) and not write.backfill
    assert write.entry.version == 7 and write.entry.value == "v"
    assert gen.send(2) == ReleaseLease(1, "k", "tok")
    outcome = finish(gen, None)
    assert (outcome.value, outcome.source) == ("v", Source.LOADED)


def test_a_fresh_shared_hit_is_backfilled_unchanged_and_returned(clock: FakeClock) -> None:
    entry = make_entry("k", "shared", NOW, ttl=30)
    gen = fill(clock, Policy(ttl=60))
    next(gen)
    write = gen.send(entry)
    assert write == Write(range(1), "k", entry, backfill=True)
    outcome = finish(gen, 1)
    assert (outcome.value, outcome.source, outcome.tier, outcome.entry) == ("shared", "L2", "remote", entry)


def test_a_failing_loader_with_stale_throttles_and_serves_it(clock: FakeClock) -> None:
    stale = make_entry("k", "old", NOW - 100, ttl=50, stale_ttl=200)
    gen = fill(clock, Policy(ttl=60, fail_safe_throttle=5.0), stale=stale)
    next(gen)
    gen.send(None)
    gen.send("tok")
    assert gen.send(None) == Load(None, None, lease=(1, "tok"))
    throttle = gen.send(LoadOutcome(error=RuntimeError("db down")))
    assert isinstance(throttle, Write) and throttle.backfill
    assert throttle.entry.fresh_until == NOW + 5.0 and throttle.entry.version == stale.version
    assert gen.send(2) == ReleaseLease(1, "k", "tok")
    outcome = finish(gen, None)
    assert (outcome.value, outcome.source) == ("old", Source.STALE_FAILSAFE)


def test_a_soft_timeout_hands_the_lease_to_the_late_load(clock: FakeClock) -> None:
    stale = make_entry("k", "old", NOW - 100, ttl=50, stale_ttl=200)
    gen = fill(clock, Policy(ttl=60, soft_timeout=0.1, hard_timeout=2.0), stale=stale)
    next(gen)
    gen.send(None)
    gen.send("tok")
    assert gen.send(None) == Load(0.1, 2.0, lease=(1, "tok"))  # soft applies: stale can be served
    outcome = finish(gen, LoadOutcome(soft_timed_out=True))  # no ReleaseLease: the late load keeps it
    assert (outcome.value, outcome.source, outcome.late) == ("old", Source.STALE_FAILSAFE, True)


def test_an_error_thrown_into_the_load_releases_the_lease_then_propagates(clock: FakeClock) -> None:
    gen = fill(clock, Policy(ttl=60))
    next(gen)
    gen.send(None)
    gen.send("tok")
    gen.send(None)
    assert gen.throw(KeyboardInterrupt()) == ReleaseLease(1, "k", "tok")
    with pytest.raises(KeyboardInterrupt):
        gen.send(None)


def test_closing_an_abandoned_flow_leaves_the_lease_to_expire(clock: FakeClock) -> None:
    gen = fill(clock, Policy(ttl=60))
    next(gen)
    gen.send(None)
    gen.send("tok")
    gen.send(None)  # in the Load
    gen.close()  # no ReleaseLease yielded (a generator may not yield on close)


def test_another_holder_means_waiting_for_its_value(clock: FakeClock) -> None:
    entry = make_entry("k", "theirs", NOW, ttl=30)
    gen = fill(clock, Policy(ttl=60, lease_wait=2.0))
    next(gen)
    gen.send(None)
    assert gen.send(None) == WaitForEntry(1, "k", 2.0, None)
    assert gen.send(entry) == Write(range(1), "k", entry, backfill=True)
    assert finish(gen, 1).source == "L2"


def test_a_caller_with_stale_waits_for_another_process_only_its_soft_timeout(clock: FakeClock) -> None:
    stale = make_entry("k", "old", NOW - 100, ttl=50, stale_ttl=200)
    gen = fill(clock, Policy(ttl=60, lease_wait=5.0, soft_timeout=0.2), stale=stale)
    next(gen)
    gen.send(None)
    assert gen.send(None) == WaitForEntry(1, "k", 0.2, None)
    outcome = finish(gen, None)  # nothing came within 0.2 s: serve stale (fail-safe)
    assert (outcome.value, outcome.source) == ("old", Source.STALE_FAILSAFE)


def test_a_failed_lease_tier_means_loading_without_a_lease(clock: FakeClock) -> None:
    gen = fill(clock, Policy(ttl=60))
    next(gen)
    gen.send(None)
    assert gen.send(NO_LEASE) == Load(None, None, lease=None)
    write = gen.send(LoadOutcome("v"))
    assert isinstance(write, Write)
    assert finish(gen, 2).source == Source.LOADED  # and no ReleaseLease


def test_many_flow_reads_once_per_tier_loads_the_rest_once(clock: FakeClock) -> None:
    hit = make_entry("a", "A", NOW, ttl=30)
    gen = many_flow(
        plan(clock), ["a", "b"], Policy(ttl=60), stale={}, versions={"a": 1, "b": 2}, fences={}, build=build
    )
    assert next(gen) == ReadMany(1, ["a", "b"], None)
    assert gen.send([hit, None]) == WriteMany(range(1), [("a", hit)], backfill=True)
    assert gen.send(None) == LoadMany(["b"])
    write = gen.send(LoadOutcome({"b": "B"}))
    assert isinstance(write, WriteMany) and [k for k, _ in write.items] == ["b"]
    result = finish(gen, None)
    assert {k: o.value for k, o in result.outcomes.items()} == {"a": "A", "b": "B"}


def test_load_timeouts_apply_soft_only_with_stale_and_before_hard() -> None:
    assert load_timeouts(Policy(ttl=1, soft_timeout=0.1, hard_timeout=2.0), True) == (0.1, 2.0)
    assert load_timeouts(Policy(ttl=1, soft_timeout=0.1, hard_timeout=2.0), False) == (None, 2.0)
    assert load_timeouts(Policy(ttl=1, soft_timeout=3.0, hard_timeout=2.0), True) == (None, 2.0)
    assert load_timeouts(Policy(ttl=1, soft_timeout=0.1, fail_safe=False), True) == (None, None)


def test_join_limit_is_the_joiners_own() -> None:
    stale = make_entry("k", "old", NOW - 100, ttl=50, stale_ttl=200)
    assert join_limit(Policy(ttl=1), None, NOW) == (None, False)
    assert join_limit(Policy(ttl=1, hard_timeout=2.0), None, NOW) == (2.0, False)
    assert join_limit(Policy(ttl=1, soft_timeout=0.1, hard_timeout=2.0), stale, NOW) == (0.1, True)
    assert join_limit(Policy(ttl=1, soft_timeout=0.1, fail_safe=False), stale, NOW) == (None, False)


# --- the public operations ---------------------------------------------------------------------


def test_set_invalidates_first_writes_bottom_up_then_publishes(clock: FakeClock) -> None:
    cache = TieredCache([FakeRemoteTier()], clock=clock)
    rt = cache._rt
    entry = make_entry("tc:k", "v", NOW)
    gen = ops.set_flow(rt.coherence, rt.plan, "tc:k", entry)
    assert next(gen) == Write(rt.plan.write_order, "tc:k", entry, backfill=False)
    assert rt.coherence._floors.get("tc:k")[0] == entry.version  # raised before any tier was touched
    assert gen.send(1) == Publish("set", ("tc:k",), (), entry.version, NOW)
    finish(gen, None)
    too_big = ops.set_flow(rt.coherence, rt.plan, "tc:k", make_entry("tc:k", "v", NOW))
    next(too_big)
    with pytest.raises(ValueTooLargeError):
        too_big.send(-1)


def test_delete_expire_tags_clear_yield_their_commands(clock: FakeClock) -> None:
    rt = TieredCache([FakeRemoteTier()], clock=clock)._rt
    co = rt.coherence
    assert list(ops.delete_flow(co, "tc:k", 5, NOW)) == [
        DeleteAll("tc:k", 5),
        Publish("delete", ("tc:k",), (), 5, NOW),
    ]
    assert list(ops.expire_flow(co, "tc:k", 6, NOW)) == [
        ExpireAll("tc:k", NOW, 6),
        Publish("expire", ("tc:k",), (), 6, NOW),
    ]
    assert list(ops.tags_flow(co, ["t"], 7, NOW)) == [
        StoreTagTimes(["t"], NOW),
        Publish("tags", (), ["t"], 7, NOW),
    ]
    assert list(ops.clear_flow(co, 8, NOW)) == [ClearAll("tc:"), Publish("clear", (), (), 8, NOW)]


def test_get_reads_through_and_answers_stale_only_when_asked(clock: FakeClock) -> None:
    p = plan(clock)
    stale = make_entry("k", "old", NOW - 100, ttl=50, stale_ttl=200)
    gen = ops.get_flow(p, "k", None, None, NOW, allow_stale=True)
    assert next(gen) == Read(1, "k", None)
    assert finish(gen, stale) == (True, "old")
    gen = ops.get_flow(p, "k", None, None, NOW, allow_stale=False)
    next(gen)
    assert finish(gen, stale) == (False, None)


# --- get_cached after the L1 walk --------------------------------------------------------------


class Slot:
    fence: Flight | None = None


def test_a_leader_announces_its_flight_and_resolves_it(clock: FakeClock) -> None:
    rt = TieredCache([FakeRemoteTier()], clock=clock)._rt
    slot = Slot()
    gen = cached_flow(rt, "tc:k", Policy(ttl=60), (None, -1, None), NOW, loop=None, slot=slot)
    assert next(gen) == Read(0, "tc:k", None)
    assert slot.fence is not None and rt.flights.get("tc:k") is slot.fence
    assert gen.send(None) == Load(None, None, lease=None)
    gen.send(LoadOutcome("v"))
    outcome = finish(gen, 1)
    assert outcome.value == "v" and slot.fence.done and rt.flights.get("tc:k") is None


def test_a_joiner_past_its_hard_timeout_detaches_the_flight_and_leads(clock: FakeClock) -> None:
    rt = TieredCache([FakeRemoteTier()], clock=clock)._rt
    hung, _ = rt.flights.join_or_lead("tc:k", None)
    slot = Slot()
    gen = cached_flow(
        rt, "tc:k", Policy(ttl=60, hard_timeout=0.5), (None, -1, None), NOW, loop=None, slot=slot
    )
    assert next(gen) == Join(hung, 0.5)
    assert gen.send(False) == Read(0, "tc:k", None)  # not resolved within 0.5 s: leads anew
    assert slot.fence is not None and slot.fence is not hung
    assert rt.flights.get("tc:k") is slot.fence
    gen.close()


def test_a_joiner_of_an_aborted_flight_starts_anew(clock: FakeClock) -> None:
    rt = TieredCache([FakeRemoteTier()], clock=clock)._rt
    gone, _ = rt.flights.join_or_lead("tc:k", None)
    slot = Slot()
    gen = cached_flow(rt, "tc:k", Policy(ttl=60), (None, -1, None), NOW, loop=None, slot=slot)
    assert next(gen) == Join(gone, None)
    rt.flights.finish(gone, error=FlightAborted("its event loop closed"))
    assert gen.send(True) == Read(0, "tc:k", None)
    assert slot.fence is not None and slot.fence is not gone
    gen.close()


def test_swr_serves_stale_and_asks_for_a_refresh(clock: FakeClock) -> None:
    rt = TieredCache([FakeRemoteTier()], clock=clock)._rt
    stale = make_entry("tc:k", "old", NOW - 100, ttl=50, stale_ttl=200)
    gen = cached_flow(rt, "tc:k", Policy(ttl=60, swr=True), (None, -1, stale), NOW, loop=None)
    assert next(gen) == Refresh("tc:k", stale)
    assert finish(gen, None).source == Source.STALE_SWR


def test_an_error_thrown_into_a_leader_ends_its_flight(clock: FakeClock) -> None:
    rt = TieredCache([FakeRemoteTier()], clock=clock)._rt
    flight, _ = rt.flights.join_or_lead("tc:k", None)
    gen = lead_flow(rt, flight, "tc:k", Policy(ttl=60), None)
    next(gen)
    with pytest.raises(RuntimeError):
        gen.throw(RuntimeError("serialisation failed"))
    assert flight.done and isinstance(flight.error, RuntimeError)
