"""Hypothesis stateful test: a 2-tier chain (memory over memory, injected clock) against a model.

The model is a dict of what was last stored per key, with its absolute times. Checked after every
step: nothing past stale_until is returned; stale values only come back through SWR or fail-safe
(and fail-safe then holds the stale value as fresh for the throttle window); a back-filled copy
never outlives the entry it was copied from; delete empties every tier; expire makes an entry
stale but keeps it; a load overtaken by a set or delete never overwrites it.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier

KEYS = st.sampled_from(["a", "b", "c"])
TTLS = st.integers(min_value=1, max_value=20).map(float)
STALES = st.sampled_from([0.0, 10.0, 30.0])
STEPS = st.sampled_from([0.5, 1.0, 3.0, 7.0, 15.0])
THROTTLE = 5.0  # TieredCache's default fail_safe_throttle


class LoaderFailed(Exception):
    pass


@dataclass
class Stored:
    value: int
    fresh_until: float
    stale_until: float


class ChainMachine(RuleBasedStateMachine):
    """Memory over memory: both tiers in-process, so the drivers' L1 walk does the back-fill."""

    def make_l2(self) -> Any:
        return MemoryTier(max_entries=1000)

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(start=1_000_000.0)
        # L1 small (evicts) and short-lived (max_ttl clamps); L2 large: L2 is the source of truth.
        self.l1 = MemoryTier(max_entries=3, max_ttl=7)
        self.l2 = self.make_l2()
        self.cache = TieredCache([self.l1, self.l2], clock=self.clock, namespace="m", ttl=10)
        self.model: dict[str, Stored] = {}
        self.values = itertools.count(1)
        self.expiry: dict[int, float] = {}  # every value ever stored -> its stale_until

    def run(self, use_async: bool, call: str, *args: Any, **kwargs: Any) -> Any:
        """Call the sync or async API, then let background work (SWR refreshes) finish."""
        if use_async:

            async def main() -> Any:
                result = await getattr(self.cache, call)(*args, **kwargs)
                pending = [t for t in self.cache._rt.tasks if not t.done()]  # SWR refreshes
                if pending:  # (not aclose(): a closed cache refuses further calls)
                    await asyncio.wait(pending, timeout=10)
                return result

            return asyncio.run(main())
        result = getattr(self.cache.sync, call)(*args, **kwargs)
        for thread in list(self.cache._rt.threads):
            thread.join(10)
        return result

    def returned(self, value: Any) -> None:
        if isinstance(value, int):
            assert self.clock() < self.expiry[value], "returned a value past its stale_until"

    @rule(key=KEYS, ttl=TTLS, stale=STALES, use_async=st.booleans())
    def set(self, key: str, ttl: float, stale: float, use_async: bool) -> None:
        value = next(self.values)
        now = self.clock()
        self.run(use_async, "set", key, value, ttl=ttl, stale_ttl=stale)
        self.model[key] = Stored(value, now + ttl, now + ttl + stale)
        self.expiry[value] = now + ttl + stale

    @rule(key=KEYS, use_async=st.booleans())
    def delete(self, key: str, use_async: bool) -> None:
        self.run(use_async, "delete", key)
        self.model.pop(key, None)
        assert self.l1.get(f"m:{key}") is None and self.l2.get(f"m:{key}") is None

    @rule(seconds=STEPS)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(key=KEYS, use_async=st.booleans())
    def expire(self, key: str, use_async: bool) -> None:
        now = self.clock()
        self.run(use_async, "expire", key)
        stored = self.model.get(key)
        if stored is not None:
            stored.fresh_until = min(stored.fresh_until, now)

    @rule(key=KEYS, ttl=TTLS, late=st.sampled_from(["set", "delete"]), use_async=st.booleans())
    def load_overtaken_by_a_write(self, key: str, ttl: float, late: str, use_async: bool) -> None:
        """The loader's data is older than a set/delete that lands while it runs."""
        self.cache.sync.delete(key)  # make sure a load happens
        self.model.pop(key, None)
        now = self.clock()
        loaded, newer = next(self.values), next(self.values)
        self.expiry[loaded] = self.expiry[newer] = now + ttl

        def loader() -> int:
            if late == "set":
                self.cache.sync.set(key, newer, ttl=ttl)
            else:
                self.cache.sync.delete(key)
            return loaded

        assert self.run(use_async, "get_cached", key, loader, ttl=ttl) == loaded
        if late == "set":
            self.model[key] = Stored(newer, now + ttl, now + ttl)
        assert self.run(use_async, "get", key, "missing") == (newer if late == "set" else "missing")

    @rule(key=KEYS, ttl=TTLS, stale=STALES, use_async=st.booleans())
    def get_cached_swr(self, key: str, ttl: float, stale: float, use_async: bool) -> None:
        now = self.clock()
        new_value = next(self.values)
        self.expiry[new_value] = now + ttl + stale
        stored = self.model.get(key)
        got = self.run(use_async, "get_cached", key, lambda: new_value, ttl=ttl, stale_ttl=stale, swr=True)
        self.returned(got)
        if stored is not None and now < stored.fresh_until:
            assert got == stored.value
            return
        if stored is not None and now < stored.stale_until:
            assert got == stored.value  # served stale at once; refreshed behind (finished by run())
        else:
            assert got == new_value
        self.model[key] = Stored(new_value, now + ttl, now + ttl + stale)

    @rule(
        key=KEYS,
        ttl=TTLS,
        stale=STALES,
        fails=st.booleans(),
        fail_safe=st.booleans(),
        use_async=st.booleans(),
    )
    def get_cached(
        self, key: str, ttl: float, stale: float, fails: bool, fail_safe: bool, use_async: bool
    ) -> None:
        now = self.clock()
        new_value = next(self.values)
        self.expiry[new_value] = now + ttl + stale
        calls: list[int] = []

        def loader() -> int:
            calls.append(1)
            if fails:
                raise LoaderFailed
            return new_value

        stored = self.model.get(key)
        try:
            got = self.run(
                use_async, "get_cached", key, loader, ttl=ttl, stale_ttl=stale, fail_safe=fail_safe
            )
        except LoaderFailed:
            assert fails
            assert stored is None or not now < stored.fresh_until
            assert not (fail_safe and stored is not None and now < stored.stale_until)
            return
        self.returned(got)
        if stored is not None and now < stored.fresh_until:
            assert got == stored.value and not calls
        elif fails:
            # only fail-safe may hand back a stale value; it then holds it as fresh for a while
            assert fail_safe and stored is not None and now < stored.stale_until and got == stored.value
            stored.fresh_until = min(now + THROTTLE, stored.stale_until)
        else:
            assert got == new_value and calls == [1]
            self.model[key] = Stored(new_value, now + ttl, now + ttl + stale)

    @rule(key=KEYS, use_async=st.booleans(), allow_stale=st.booleans())
    def get(self, key: str, use_async: bool, allow_stale: bool) -> None:
        now = self.clock()
        got = self.run(use_async, "get", key, "missing", allow_stale=allow_stale)
        stored = self.model.get(key)
        self.returned(got)
        fresh = stored is not None and now < stored.fresh_until
        stale_ok = allow_stale and stored is not None and now < stored.stale_until
        if fresh or stale_ok:
            assert stored is not None and got == stored.value
        else:
            assert got == "missing"

    @invariant()
    def backfill_never_extends_a_lifetime(self) -> None:
        for key in "abc":
            upper, lower = self.l1.get(f"m:{key}"), self.l2.get(f"m:{key}")
            if upper is not None:
                if lower is not None and upper.version == lower.version:
                    assert upper.stale_until <= lower.stale_until
                    assert upper.fresh_until <= lower.fresh_until
                assert upper.value in self.expiry and upper.stale_until <= self.expiry[upper.value]


class RemoteChainMachine(ChainMachine):
    """Memory over a remote-like tier (bytes through the codec): the flow does the back-fill."""

    def make_l2(self) -> Any:
        return FakeRemoteTier()


class LeasedRemoteChainMachine(ChainMachine):
    """Memory over a remote-like tier that offers the lease: a flight's leader reads it, takes the
    lease on a miss and reads it once more under the lease before loading."""

    def make_l2(self) -> Any:
        return FakeRemoteTier(leases=True)


for machine in (ChainMachine, RemoteChainMachine, LeasedRemoteChainMachine):
    machine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)

test_memory_over_memory_matches_model = ChainMachine.TestCase
test_memory_over_remote_matches_model = RemoteChainMachine.TestCase
test_memory_over_leased_remote_matches_model = LeasedRemoteChainMachine.TestCase
