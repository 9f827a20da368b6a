"""Property test of RedisTier's version fence (the Lua set-if-newer and tombstone), on fakeredis[lua].

A fast extra: the same scripts also run on real Redis in tests/contract and tests/integration.
"""

from __future__ import annotations

import time

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiercache._serde import JsonCodec
from tiercache._tier import TierBinding
from tiercache.adapters.redis import RedisTier
from tiercache.testing import make_entry

# Versions around the two 10-digit halves the Lua compares, and real nanosecond-clock versions.
VERSIONS = st.sampled_from(
    [
        0,
        1,
        9_999_999_999,
        10_000_000_000,
        10_000_000_001,
        1_764_000_000_000_000_000,
        1_764_000_000_000_000_001,
        1_764_000_001_000_000_000,
        2**64 - 1,
    ]
)
OPS = st.lists(st.tuples(st.sampled_from(["set", "delete"]), VERSIONS), max_size=12)


def model(ops: list[tuple[str, int]]) -> int | None:
    """The version a reader should see after ``ops`` (None: nothing), per the tier contract."""
    state: tuple[str, int] | None = None
    for op, v in ops:
        if op == "set":
            if state is None or state[1] < v or (state[1] == v and state[0] == "v"):
                state = ("v", v)
        elif state is None or state[1] <= v:
            state = ("d", v)
    return state[1] if state is not None and state[0] == "v" else None


@settings(max_examples=150, deadline=None)
@given(ops=OPS)
def test_fenced_writes_match_the_model(ops: list[tuple[str, int]]) -> None:
    server = fakeredis.FakeServer()
    tier = RedisTier(client=fakeredis.FakeRedis(server=server), prefix="prop")
    tier.bind(TierBinding(clock=time.time, codec=JsonCodec()))
    now = time.time()
    for op, v in ops:
        if op == "set":
            tier.set("k", make_entry("k", v, now, version=v))
        else:
            tier.delete("k", v)
    got = tier.get("k")
    assert (got.version if got is not None else None) == model(ops)


@pytest.mark.parametrize("version", [-1, 2**64, 1.5])
def test_versions_outside_the_header_width_are_refused(version: object) -> None:
    tier = RedisTier(client=fakeredis.FakeRedis(), prefix="prop")
    tier.bind(TierBinding(clock=time.time, codec=JsonCodec()))
    with pytest.raises(ValueError):
        tier.delete("k", version)  # type: ignore[arg-type]


def test_a_decode_responses_client_is_refused() -> None:
    from tiercache import ConfigurationError

    with pytest.raises(ConfigurationError):
        RedisTier(client=fakeredis.FakeRedis(decode_responses=True))
