"""Cached methods on every supported Python: async ones look async to inspect, classmethods get
bound helpers (``C.method.invalidate(...)``) and never a silently wrong key."""

from __future__ import annotations

import asyncio
import inspect
import sys

import pytest

from tiercache import ConfigurationError, TieredCache, tiered_cache
from tiercache.adapters.memory import MemoryTier


def test_an_async_cached_method_is_a_coroutine_function_bound_or_not() -> None:
    cache = TieredCache([MemoryTier()], namespace="am")

    class Repo:
        def __cache_key__(self) -> str:
            return "r"

        @tiered_cache(cache)
        async def get(self, item: int) -> int:
            return item

        @tiered_cache(cache)
        def sync_get(self, item: int) -> int:
            return item

    assert inspect.iscoroutinefunction(Repo.get)
    assert inspect.iscoroutinefunction(Repo().get)
    assert not inspect.iscoroutinefunction(Repo.sync_get)
    assert not inspect.iscoroutinefunction(Repo().sync_get)
    assert list(inspect.signature(Repo.get).parameters) == ["self", "item"]
    assert asyncio.run(Repo().get(2)) == 2


def test_tiered_cache_above_classmethod_binds_the_class() -> None:
    cache = TieredCache([MemoryTier()], namespace="cm")
    calls: list[str] = []

    class Base:
        @tiered_cache(cache)
        @classmethod
        def name(cls, x: int) -> str:
            calls.append(cls.__name__)
            return f"{cls.__name__}{x}-{len(calls)}"

    class Child(Base):
        pass

    assert Base.name(1) == "Base1-1" and Base.name(1) == "Base1-1"
    assert Child.name(1) == "Child1-2"
    assert Child().name(1) == "Child1-2"  # through an instance: still the class
    assert Base.name.cache_key(1) != Child.name.cache_key(1)
    Base.name.invalidate(1)  # bound to Base on every Python version
    assert Base.name(1) == "Base1-3" and Child.name(1) == "Child1-2"
    assert Child.name.lookup(1).value == "Child1-2"


def test_an_unbound_classmethod_helper_is_an_error_not_a_wrong_key() -> None:
    # Python 3.13 stopped chaining classmethod to the wrapped descriptor: C.m.invalidate then
    # reaches the cached function without its class. It must say so, not key on the argument.
    cache = TieredCache([MemoryTier()], namespace="cu")

    class Base:
        @classmethod
        @tiered_cache(cache)
        def name(cls, x: int) -> str:
            return f"{cls.__name__}{x}"

    unbound = Base.__dict__["name"].__func__  # what C.name.invalidate reaches on 3.13
    with pytest.raises(ConfigurationError, match="above @classmethod"):
        unbound.invalidate(1)
    with pytest.raises(ConfigurationError, match="above @classmethod"):
        unbound.cache_key(1)
    assert Base.name(1) == "Base1"
    if sys.version_info >= (3, 13):  # the real thing
        with pytest.raises(ConfigurationError, match="above @classmethod"):
            Base.name.invalidate(1)
    else:
        Base.name.invalidate(1)  # still bound through the classmethod


def test_staticmethod_is_refused_above_with_a_clear_error() -> None:
    cache = TieredCache([MemoryTier()], namespace="sm")
    with pytest.raises(ConfigurationError, match="below @staticmethod"):
        tiered_cache(cache)(staticmethod(lambda x: x))


def test_the_inline_int_key_is_the_default_hash_exactly() -> None:
    from tiercache._decorator import stable_hash

    cache = TieredCache([MemoryTier()], namespace="i{k}\"'")  # braces and quotes: a literal

    @tiered_cache(cache)
    def one(a: object) -> object:
        return a

    @tiered_cache(cache)
    def two(a: object, b: object = 7) -> object:
        return a

    prefix = one.cache_key(0).rsplit(":", 1)[0] + ":"
    for args in [(0,), (-1,), (2**63 - 1,), (-(2**63),), (2**63,), (True,), (1.0,), ("1",), (None,)]:
        assert one.cache_key(*args) == prefix + stable_hash(args), args
    prefix2 = two.cache_key(0).rsplit(":", 1)[0] + ":"
    for args in [(1, 2), (1, True), (2**64, 1), (-5, -(2**63))]:
        assert two.cache_key(*args) == prefix2 + stable_hash(args), args
    assert two.cache_key(1) == prefix2 + stable_hash((1, 7))
    assert len({one.cache_key(1), one.cache_key(True), one.cache_key("1"), one.cache_key(1.0)}) == 4


def test_the_plain_fast_path_of_the_default_hash_is_the_typed_form() -> None:
    import orjson

    from tiercache import InvalidKeyError
    from tiercache._decorator import stable_hash
    from tiercache._serde import encode_key_args

    cases: list[tuple[object, ...]] = [(1.5,), (-0.0,), (0.0,), (1e300, "x", None, True, 3), ("a" * 60, 2.5)]
    cases += [(2**64, 1.0), ((1, 2),), ((1, "a"), 3), ((), None), ((2**64, 1),), ((1, (2,)),), ((1, [2]),)]
    cases += [((1.5, float("-0")),), ((True, None),)]
    for args in cases:
        raw = orjson.dumps(encode_key_args(args), option=orjson.OPT_SORT_KEYS)
        expected = raw.decode() if len(raw) <= 48 else None
        if expected is not None:
            assert stable_hash(args) == expected, args
    assert stable_hash((0.0,)) != stable_hash((-0.0,)) != stable_hash((0,))
    shapes = [((1, 2),), ([1, 2],), (1, 2), ((1, 2.0),)]
    assert len({stable_hash(args) for args in shapes}) == 4
    with pytest.raises(InvalidKeyError):
        stable_hash(((1, float("nan")),))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(InvalidKeyError):
            stable_hash((1, bad))
