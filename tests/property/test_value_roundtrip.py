"""One rule, property-tested: a value comes back equal and of the same type whichever tier answered.

For generated nested values of every supported type, written once through a chain of memory +
Cloudflare KV (tiercache's fake) + real Redis, the writer's L1 hit, a cold reader's KV hit and a
cold reader's Redis hit return equal values of equal types, all the way down -- untyped builtins
without any annotation, user classes through the loader's annotation, ``value_type=`` or a
decorated function's return annotation; sync and async. A fresh interpreter reads them back too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pickle
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.redis_servers import purge_prefix
from tests.values_types import Address, Color, Level, Point, User
from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier
from tiercache.testing import FakeCloudflareKV

pytestmark = pytest.mark.redis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --- values ---------------------------------------------------------------------------------------

hashable_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # beyond 64 bits too
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-(10**9), max_value=10**9),
    st.uuids(),
    st.dates(),
    st.datetimes(timezones=st.one_of(st.none(), st.just(dt.timezone.utc))),
    st.times(),
    st.timedeltas(),
    st.sampled_from(Color),
    st.sampled_from(Level),
    st.builds(Point, st.integers(-5, 5), st.text(max_size=3)),
)
hashables = st.recursive(
    hashable_leaves,
    lambda inner: st.one_of(
        st.tuples(inner, inner), st.lists(inner, max_size=3).map(tuple), st.frozensets(inner, max_size=3)
    ),
    max_leaves=6,
)
builtins = st.recursive(
    hashables,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.sets(hashables, max_size=3),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
        st.dictionaries(st.sampled_from(["$set", "$x", "$dict", "a"]), inner, max_size=1),  # tag look-alikes
        st.dictionaries(hashables, inner, max_size=3),
    ),
    max_leaves=12,
)
addresses = st.builds(Address, st.text(max_size=5), st.dates())
users = st.builds(
    User,
    id=st.integers(-(2**63), 2**63 - 1),
    name=st.text(max_size=6),
    tags=st.sets(st.text(max_size=3), max_size=3),
    balance=st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-1000, max_value=1000),
    addresses=st.lists(addresses, max_size=2),
    color=st.one_of(st.none(), st.sampled_from(Color)),
    coords=st.one_of(st.none(), st.tuples(st.integers(), st.integers())),
)
typed_values = st.one_of(
    st.tuples(st.just(User), users),
    st.tuples(st.just(list[User]), st.lists(users, max_size=2)),
    st.tuples(st.just(dict[int, Address]), st.dictionaries(st.integers(), addresses, max_size=2)),
    st.tuples(
        st.just(tuple[Address, Point]), st.tuples(addresses, st.builds(Point, st.integers(), st.text()))
    ),
    st.tuples(st.just(User | None), st.one_of(st.none(), users)),
)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same type at every level."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) and same_key(k, b) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (set, frozenset)):
        return len(a) == len(b) and all(any(same(x, y) for y in b if y == x) for x in a)
    if hasattr(a, "__dataclass_fields__"):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return bool(a == b)


def same_key(k: Any, other: dict[Any, Any]) -> bool:
    return any(x == k and type(x) is type(k) for x in other)


# --- the chain ------------------------------------------------------------------------------------


class Chain:
    """A writer (memory + KV + Redis), a cold KV reader and a cold Redis reader, one namespace."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.kv = FakeCloudflareKV(write_interval=0.0, budget=10**9)
        ns = "rt" + uuid.uuid4().hex[:8]
        tiers = [MemoryTier(), self.kv.tier(budget=10**9), RedisTier(url=redis_url, prefix=prefix)]
        self.writer = TieredCache(tiers, namespace=ns, ttl=600)
        self.kv_reader = TieredCache([MemoryTier(), self.kv.tier(budget=10**9)], namespace=ns, ttl=600)
        self.redis_reader = TieredCache(
            [MemoryTier(), RedisTier(url=redis_url, prefix=prefix)], namespace=ns, ttl=600
        )
        self.caches = (self.writer, self.kv_reader, self.redis_reader)

    def close(self) -> None:
        for c in self.caches:
            c.sync.close()


@pytest.fixture(scope="module")
def chain(shared_redis_url: str) -> Iterator[Chain]:
    prefix = f"tctest-rt-{uuid.uuid4().hex[:8]}"
    c = Chain(shared_redis_url, prefix)
    yield c
    c.close()
    purge_prefix(shared_redis_url, prefix)


def miss() -> Any:
    raise AssertionError("a tier should have answered")


def read_all_sync(chain: Chain, key: str, value: Any, **typed: Any) -> list[tuple[str, Any]]:
    got = [("loaded", chain.writer.sync.get_cached(key, lambda: value, **typed))]
    got.append(("L1", chain.writer.sync.get_cached(key, miss, **typed)))
    for name, reader in (("KV", chain.kv_reader), ("Redis", chain.redis_reader)):
        found = reader.sync.lookup(key, miss, **typed)
        assert found.source == "L2", (name, found)
        got.append((name, found.value))
    return got


SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(value=builtins)
def test_builtins_round_trip_without_annotations_sync(chain: Chain, value: Any) -> None:
    key = "b:" + uuid.uuid4().hex
    for tier, got in read_all_sync(chain, key, value):
        assert same(got, value), (tier, got, value)


@SETTINGS
@given(case=typed_values)
def test_user_classes_round_trip_through_value_type_sync(chain: Chain, case: tuple[Any, Any]) -> None:
    tp, value = case
    key = "t:" + uuid.uuid4().hex
    for tier, got in read_all_sync(chain, key, value, value_type=tp):
        assert same(got, value), (tier, got, value)


@SETTINGS
@given(case=typed_values)
def test_user_classes_round_trip_through_the_loaders_annotation_sync(
    chain: Chain, case: tuple[Any, Any]
) -> None:
    tp, value = case

    def load() -> Any:
        return value

    load.__annotations__ = {"return": tp}
    key = "a:" + uuid.uuid4().hex
    assert same(chain.writer.sync.get_cached(key, load), value)
    assert same(chain.writer.sync.get_cached(key, miss, value_type=tp), value)
    for reader in (chain.kv_reader, chain.redis_reader):

        def read() -> Any:
            raise AssertionError("should hit")

        read.__annotations__ = {"return": tp}
        found = reader.sync.lookup(key, read)
        assert found.source == "L2" and same(found.value, value), (found, value)


@SETTINGS
@given(value=builtins, case=typed_values)
def test_values_round_trip_async(chain: Chain, value: Any, case: tuple[Any, Any]) -> None:
    tp, typed = case

    async def scenario() -> None:
        for key, v, options in (
            ("ab:" + uuid.uuid4().hex, value, {}),
            ("at:" + uuid.uuid4().hex, typed, {"value_type": tp}),
        ):

            async def load(v: Any = v) -> Any:
                return v

            assert same(await chain.writer.get_cached(key, load, **options), v)
            assert same(await chain.writer.get_cached(key, miss, **options), v)
            for reader in (chain.kv_reader, chain.redis_reader):
                found = await reader.lookup(key, miss, **options)
                assert found.source == "L2" and same(found.value, v), (found, v)

    asyncio.run(scenario())


def test_decorated_functions_round_trip_through_their_return_annotation(chain: Chain) -> None:
    from tiercache import tiered_cache

    user = User(
        7, "Ada", {"x", "y"}, Decimal("1.50"), [Address("Paris", dt.date(2020, 1, 2))], Color.BLUE, (1, 2)
    )

    def define(cache: TieredCache) -> Any:
        @tiered_cache(cache, key="user:{uid}")
        def get_user(uid: int) -> User:
            if cache is not chain.writer:
                raise AssertionError("should hit")
            return user

        @tiered_cache(cache, key="users:{uid}")
        async def get_users(uid: int) -> dict[Point, list[User]]:
            if cache is not chain.writer:
                raise AssertionError("should hit")
            return {Point(1, "a"): [user]}

        return get_user, get_users

    uid = uuid.uuid4().int % 10**9
    for cache in chain.caches:
        get_user, get_users = define(cache)
        assert same(get_user(uid), user)
        assert same(asyncio.run(get_users(uid)), {Point(1, "a"): [user]})


FRESH_PROCESS = textwrap.dedent(
    """
    import pickle, sys
    from tests.values_types import User
    from tiercache import TieredCache
    from tiercache.adapters.memory import MemoryTier
    from tiercache.adapters.redis import RedisTier
    url, prefix, ns, keys = pickle.loads(bytes.fromhex(sys.argv[1]))
    cache = TieredCache([MemoryTier(), RedisTier(url=url, prefix=prefix)], namespace=ns, ttl=600)
    out = []
    for key, typed in keys:
        def miss():
            raise AssertionError("should hit")
        found = cache.sync.lookup(key, miss, value_type=User if typed else None)
        out.append((found.source, found.value))
    sys.stdout.write(pickle.dumps(out).hex())
    cache.sync.close()
    """
)


def test_a_fresh_process_reads_the_same_values(shared_redis_url: str) -> None:
    prefix = f"tctest-rt-{uuid.uuid4().hex[:8]}"
    ns = "fp" + uuid.uuid4().hex[:8]
    cache = TieredCache([RedisTier(url=shared_redis_url, prefix=prefix)], namespace=ns, ttl=600)
    user = User(1, "Ada", {"a"}, Decimal("-0.01"), [Address("Oslo", dt.date(2021, 3, 4))], Color.RED, (3, 4))
    values: list[tuple[str, Any, bool]] = [
        ("set", {1, 2, (3, "x")}, False),
        ("map", {1: "a", "1": b"b", (2, 3): frozenset({Level.HIGH})}, False),
        ("nt", [Point(1, "p"), Color.BLUE, uuid.UUID(int=5)], False),
        ("dates", (dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), dt.time(1, 2), dt.timedelta(3)), False),
        ("big", [2**70, Decimal("1.000"), -0.0], False),
        ("user", user, True),
    ]
    try:
        for key, value, typed in values:
            cache.sync.set(key, value, value_type=User if typed else None)
        arg = pickle.dumps((shared_redis_url, prefix, ns, [(k, t) for k, _, t in values])).hex()
        proc = subprocess.run(
            [sys.executable, "-c", FRESH_PROCESS, arg], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        got = pickle.loads(bytes.fromhex(proc.stdout))
        for (key, value, _), (source, read) in zip(values, got, strict=True):
            assert source in ("L1", "L2"), key  # a tier hit, never the loader
            assert same(read, value), (key, read, value)
    finally:
        cache.sync.close()
        purge_prefix(shared_redis_url, prefix)
