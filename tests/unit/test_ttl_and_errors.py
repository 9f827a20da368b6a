"""TTLs as users write them, and errors that say what to do (unknown options, loaders, keys, tier order)."""

from __future__ import annotations

import asyncio
import functools
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from tiercache import ConfigurationError, InvalidKeyError, TieredCache, tiered_cache, tiered_cache_many
from tiercache._ttl import seconds
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeRemoteTier


def cache(**kw: Any) -> TieredCache:
    return TieredCache([MemoryTier()], **kw)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (90, 90.0),
        (1.5, 1.5),
        (timedelta(minutes=5), 300.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        (" 2H ", 7200.0),
    ],
)
def test_durations(given: Any, expected: float) -> None:
    assert seconds(given) == expected


@pytest.mark.parametrize("bad", ["1 hour", "h", "30", "-5s", "", True, None, [1], float("nan")])
def test_bad_durations_name_the_forms(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"ttl.*'90s', '5m', '1h', '1d'|finite"):
        seconds(bad)


def test_every_ttl_option_takes_durations() -> None:
    c = cache(ttl="1h", stale_ttl=timedelta(days=1), hard_timeout="2s", fail_safe_throttle="1m")
    p = c.policy
    assert (p.ttl, p.stale_ttl, p.hard_timeout, p.fail_safe_throttle) == (3600.0, 86400.0, 2.0, 60.0)
    assert c.policy_for(ttl="90s", stale_ttl="5m").ttl == 90.0
    c.sync.set("k", 1, ttl="1d")
    assert c.sync.get_cached("k2", lambda: 2, ttl=timedelta(seconds=30), soft_timeout="1s") == 2

    @tiered_cache(c, ttl="5m", stale_ttl="1h")
    def f(x: int) -> int:
        return x

    @tiered_cache_many(c, key="m:{}", ttl="1d")
    def g(ids: list[int]) -> dict[int, int]:
        return {i: i for i in ids}

    assert f(1) == 1 and g([1, 2]) == {1: 1, 2: 2}


def test_string_ttl_error_is_a_configuration_error_not_a_type_error() -> None:
    with pytest.raises(ConfigurationError, match=r"ttl='1 hour' is not a duration"):
        cache(ttl="1 hour")
    with pytest.raises(ConfigurationError, match="ttl must be a positive number"):
        cache(ttl="0s")


def test_unknown_option_lists_the_valid_ones() -> None:
    c = cache()
    with pytest.raises(ConfigurationError) as err:
        c.sync.get_cached("k", lambda: 1, tll=30)
    msg = str(err.value)
    assert "unknown cache option 'tll' (did you mean 'ttl'?)" in msg
    for name in ("ttl", "stale_ttl", "tags", "value_type", "swr", "fail_safe", "hard_timeout"):
        assert name in msg
    assert "converter" not in msg
    with pytest.raises(ConfigurationError, match="unknown cache option 'stale'"):
        tiered_cache(c, stale=5)


def load_user(user_id: int) -> dict[str, int]:
    return {"id": user_id}


async def aload() -> int:
    return 1


@pytest.mark.parametrize(
    ("loader", "message"),
    [
        (load_user, r"the loader load_user\(user_id\) takes arguments.*lambda: load_user\(\.\.\.\)"),
        (lambda a, b=1: a, r"takes arguments"),
        (load_user(1), r"not dict .*pass `load`, not `load\(\)`"),
        (None, r"not NoneType None"),
    ],
)
def test_loader_mistakes(loader: Any, message: str) -> None:
    c = cache()
    with pytest.raises(ConfigurationError, match=message):
        c.sync.get_cached("k", loader)
    with pytest.raises(ConfigurationError, match=message):
        asyncio.run(c.get_cached("k", loader))
    with pytest.raises(ConfigurationError, match=message):
        c.sync.lookup("k", loader)


def test_a_called_coroutine_function_is_named_and_closed() -> None:
    c = cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        with pytest.raises(ConfigurationError, match=r"the loader is a coroutine \(aload\(\) was called\)"):
            asyncio.run(c.get_cached("k", aload()))  # type: ignore[arg-type]


class Repo:
    def load(self) -> int:
        return 7


@pytest.mark.parametrize(
    "loader",
    [lambda: 1, functools.partial(load_user, 3), Repo().load, lambda *a, **k: 1, aload, lambda x=1: x],
)
def test_good_loaders_pass(loader: Callable[[], Any]) -> None:
    assert asyncio.run(cache().get_cached("k", loader)) is not None


def test_garbled_templates_and_arguments_say_what_to_do() -> None:
    c = cache()
    with pytest.raises(ConfigurationError, match=r"key template 'user:\{user_id' is not a valid template"):
        tiered_cache(c, key="user:{user_id")(load_user)

    @tiered_cache(c)
    def f(x: object) -> int:
        return 1

    with pytest.raises(InvalidKeyError) as err:
        f(Repo())
    assert "cannot serialise a Repo" in str(err.value)
    assert "Type is not JSON serializable" not in str(err.value)
    assert 'key="user:{user_id}"' in str(err.value)


def test_tiers_in_the_wrong_order_are_refused() -> None:
    remote = FakeRemoteTier({})
    with pytest.raises(ConfigurationError, match=r"fastest first.*put it first"):
        TieredCache([remote, MemoryTier()])
    TieredCache([MemoryTier(), FakeRemoteTier({})])  # the right order


def test_tier_max_ttl_takes_durations() -> None:
    from tiercache.adapters.redis import RedisTier

    assert MemoryTier(max_ttl="1h").max_ttl == 3600.0
    assert MemoryTier(max_ttl=timedelta(seconds=30)).max_ttl == 30.0
    assert RedisTier(url="redis://127.0.0.1:1/0", max_ttl="5m").max_ttl == 300.0  # no connection made
    with pytest.raises(ConfigurationError, match=r"MemoryTier.max_ttl='an hour' is not a duration"):
        MemoryTier(max_ttl="an hour")


async def load_many_async(keys: list[str]) -> dict[str, int]:
    return {k: 1 for k in keys}


@pytest.mark.parametrize(
    ("load_many", "message"),
    [
        ({"a": 1}, r"not dict: pass `load_many`, not `load_many\(\.\.\.\)`"),
        (lambda: {}, r"must take exactly one argument"),
        (lambda keys, other: {}, r"must take exactly one argument"),
    ],
)
def test_batch_loader_mistakes(load_many: Any, message: str) -> None:
    c = cache()
    with pytest.raises(ConfigurationError, match=message):
        c.sync.get_many_cached(["a"], load_many)
    with pytest.raises(ConfigurationError, match=message):
        asyncio.run(c.get_many_cached(["a"], load_many))


def test_good_batch_loaders_pass() -> None:
    c = cache()
    assert c.sync.get_many_cached(["a"], lambda keys: {k: 1 for k in keys}) == {"a": 1}
    assert asyncio.run(c.get_many_cached(["b"], load_many_async)) == {"b": 1}
    assert c.sync.get_many_cached(["c"], lambda *keys: {k: 1 for k in keys[0]}) == {"c": 1}
