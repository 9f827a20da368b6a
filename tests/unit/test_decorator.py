"""@tiered_cache: keys, signatures, invalidate/uncached, sync and async functions."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import inspect
from typing import Any

import pytest

from tiercache import ConfigurationError, InvalidKeyError, TieredCache, tiered_cache
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier


@pytest.fixture
def cache() -> TieredCache:
    return TieredCache([MemoryTier(), FakeRemoteTier()], clock=FakeClock(), namespace="d")


def test_template_key_uses_bound_arguments_with_defaults(cache: TieredCache) -> None:
    @tiered_cache(cache, key="report:{day}:{region}")
    def report(day: str, region: str = "eu") -> str:
        return f"{day}/{region}"

    assert report.cache_key("mon") == "d:report:mon:eu"
    assert report.cache_key(day="mon", region="us") == "d:report:mon:us"
    assert report("mon") == "mon/eu"


def test_template_may_use_attribute_access(cache: TieredCache) -> None:
    @dataclasses.dataclass
    class Req:
        user_id: int

    @tiered_cache(cache, key="u:{req.user_id}")
    def handler(req: Req) -> int:
        return req.user_id

    assert handler.cache_key(Req(7)) == "d:u:7"


def test_template_naming_a_missing_parameter_fails_at_decoration(cache: TieredCache) -> None:
    with pytest.raises(ConfigurationError, match="user_id"):

        @tiered_cache(cache, key="user:{user_id}")
        def f(uid: int) -> int:
            return uid

    with pytest.raises(ConfigurationError):

        @tiered_cache(cache, key="user:{}")
        def g(uid: int) -> int:
            return uid


def test_default_key_is_stable_and_tells_arguments_apart(cache: TieredCache) -> None:
    @tiered_cache(cache)
    def f(*args: Any, **kwargs: Any) -> None:
        return None

    keys = {
        f.cache_key(1, 2),
        f.cache_key("1 2"),
        f.cache_key(1),
        f.cache_key(1.0),
        f.cache_key("1"),
        f.cache_key(True),
        f.cache_key(None),
        f.cache_key([1, 2]),
        f.cache_key(a=1),
        f.cache_key(b=1),
    }
    assert len(keys) == 10
    assert f.cache_key(a=1, b=2) == f.cache_key(b=2, a=1)
    assert f.cache_key(1, 2).startswith("d:" + __name__ + ".")
    # stable across processes: a fixed expected digest for a fixed input
    assert f.cache_key(1, "x") == f.cache_key(1, "x")


def test_default_key_applies_defaults_and_normalises_positional_vs_keyword(cache: TieredCache) -> None:
    @tiered_cache(cache)
    def g(day: dt.date, region: str = "eu") -> str:
        return region

    d = dt.date(2026, 11, 30)
    assert g.cache_key(d) == g.cache_key(d, "eu") == g.cache_key(day=d, region="eu")
    assert g.cache_key(d) != g.cache_key(d, "us")


def test_default_key_refuses_objects_without_a_stable_form(cache: TieredCache) -> None:
    class Opaque:
        pass

    @tiered_cache(cache)
    def h(x: Any) -> int:
        return 1

    with pytest.raises(InvalidKeyError, match="Opaque"):
        h(Opaque())


def test_default_key_of_a_method_needs_the_instance(cache: TieredCache) -> None:
    # Python 3.12+ raises __set_name__'s error as is; older versions wrap it in a RuntimeError
    with pytest.raises((RuntimeError, ConfigurationError)) as info:

        class Repo:
            @tiered_cache(cache)
            def find(self, uid: int) -> int:
                return uid * 2

    error = info.value if isinstance(info.value, ConfigurationError) else info.value.__cause__
    assert isinstance(error, ConfigurationError)
    assert "__cache_key__" in str(error)


def test_sync_function_caches_invalidates_and_keeps_uncached(cache: TieredCache) -> None:
    calls: list[int] = []

    @tiered_cache(cache, key="user:{uid}", ttl=30)
    def get_user(uid: int) -> dict[str, int]:
        """Docstring kept."""
        calls.append(uid)
        return {"id": uid}

    assert get_user(1) == get_user(1) == {"id": 1}
    assert calls == [1]
    get_user.invalidate(1)
    get_user(1)
    assert calls == [1, 1]
    assert get_user.uncached(5) == {"id": 5}
    assert calls == [1, 1, 5]
    assert get_user.__doc__ == "Docstring kept."
    assert get_user.__name__ == "get_user"
    assert str(inspect.signature(get_user)) == "(uid: 'int') -> 'dict[str, int]'"


def test_async_function_caches_and_invalidate_is_awaitable(cache: TieredCache) -> None:
    calls: list[int] = []

    @tiered_cache(cache, key="user:{uid}")
    async def get_user(uid: int) -> int:
        calls.append(uid)
        return uid

    async def main() -> None:
        assert await get_user(3) == 3
        assert await get_user(3) == 3
        result = get_user.invalidate(3)
        assert inspect.isawaitable(result)
        await result
        assert await get_user(3) == 3

    assert inspect.iscoroutinefunction(get_user)
    asyncio.run(main())
    assert calls == [3, 3]


def test_none_results_are_cached_by_the_decorator(cache: TieredCache) -> None:
    calls: list[int] = []

    @tiered_cache(cache, key="n:{x}")
    def f(x: int) -> None:
        calls.append(x)

    f(1)
    f(1)
    assert calls == [1]


def test_decorator_options_are_validated_up_front(cache: TieredCache) -> None:
    with pytest.raises(ConfigurationError):
        tiered_cache(cache, ttl=-1)
    with pytest.raises(ConfigurationError):
        tiered_cache("not a cache")  # type: ignore[arg-type]


def test_decorator_without_l1_still_works() -> None:
    remote = FakeRemoteTier()
    cache = TieredCache([remote])
    calls: list[int] = []

    @tiered_cache(cache, key="k:{x}")
    def f(x: int) -> int:
        calls.append(x)
        return x

    assert f(1) == f(1) == 1
    assert calls == [1]
    assert remote.calls["get"] == 2


def test_expiry_is_respected_on_the_fast_path() -> None:
    clock = FakeClock()
    cache = TieredCache([MemoryTier()], clock=clock, ttl=10)
    calls: list[int] = []

    @tiered_cache(cache, key="k:{x}")
    def f(x: int) -> int:
        calls.append(x)
        return len(calls)

    assert f(1) == 1
    clock.advance(9.9)
    assert f(1) == 1
    clock.advance(0.2)
    assert f(1) == 2


def test_template_index_and_format_spec_follow_str_format_rules(cache: TieredCache) -> None:
    @tiered_cache(cache, key="r:{req[user]}:{req[ids][0]}:{price:.2f}:{name!r}")
    def handler(req: dict[str, Any], price: float, name: str) -> int:
        return 1

    req = {"user": "ada", "ids": [7, 8]}
    expected = "d:" + "r:{req[user]}:{req[ids][0]}:{price:.2f}:{name!r}".format(
        req=req, price=3.14159, name="x"
    )
    assert handler.cache_key(req, 3.14159, "x") == expected


def test_keyword_only_positional_only_and_varargs_are_bound_like_the_function(cache: TieredCache) -> None:
    seen: list[Any] = []

    @tiered_cache(cache, key="v:{a}:{b}:{args}:{c}:{kw}")
    def f(a: int, /, b: int = 2, *args: int, c: int = 3, **kw: int) -> int:
        seen.append((a, b, args, c, kw))
        return a

    assert f(1) == 1
    assert f.cache_key(1) == "d:v:1:2:():3:{}"
    assert f.cache_key(1, 5, 6, 7, c=9, z=1) == "d:v:1:5:(6, 7):9:{'z'%3A 1}"  # ':' escaped in values
    f(1, 5, 6, 7, c=9, z=1)
    assert seen == [(1, 2, (), 3, {}), (1, 5, (6, 7), 9, {"z": 1})]
    with pytest.raises(TypeError):
        f(a=1)  # type: ignore[call-arg]


def test_decorated_lookup_says_where_the_value_came_from(cache: TieredCache) -> None:
    @tiered_cache(cache, key="w:{x}")
    def f(x: int) -> int:
        return x

    @tiered_cache(cache, key="aw:{x}")
    async def g(x: int) -> int:
        return x

    assert f.lookup(1).source == "LOADED"
    assert f.lookup(1) == (1, "L1", "memory")

    async def main() -> None:
        assert (await g.lookup(2)).source == "LOADED"
        assert (await g.lookup(2)).source == "L1"

    asyncio.run(main())


def test_testing_bypass_turns_caching_off_and_back_on(cache: TieredCache) -> None:
    from tiercache.testing import bypass

    calls: list[int] = []

    @tiered_cache(cache, key="by:{x}")
    def f(x: int) -> int:
        calls.append(x)
        return len(calls)

    assert f(1) == 1 and f(1) == 1
    with bypass(cache):
        assert f(1) == 2 and f(1) == 3  # the inline hit path misses too
        assert cache.sync.get("by:1") is None
        cache.sync.set("other", 5)
        assert cache.sync.get("other") is None
    assert f(1) == 1  # the shared tier still held the value: caching resumes
