"""Issue 15's defects, one test each: typed values from every tier, validating decoding, method
keys, key collisions, and the key checks on str subclasses."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import inspect
import typing
import uuid
from decimal import Decimal
from typing import Any, NamedTuple

import orjson
import pytest

from tiercache import ConfigurationError, InvalidKeyError, SerializationError, TieredCache, tiered_cache
from tiercache._keys import check_key
from tiercache._serde import JsonCodec, converter_for, decode_value, encode_value
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier

if typing.TYPE_CHECKING:
    from collections import OrderedDict as OnlyForTypeCheckers


@dataclasses.dataclass
class Row:
    id: int
    ok: bool
    ids: tuple[int, ...]
    amount: Decimal


class Pair(NamedTuple):
    a: int
    b: str


def pair_of_caches(clock: FakeClock) -> tuple[TieredCache, TieredCache, FakeRemoteTier]:
    remote = FakeRemoteTier()
    writer = TieredCache([MemoryTier(), remote], clock=clock, namespace="v")
    reader = TieredCache([MemoryTier(), FakeRemoteTier(remote.store)], clock=clock, namespace="v")
    return writer, reader, remote


def never() -> Any:
    raise AssertionError("should come from a tier")


# --- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [{1, 2}, frozenset({"a"}), (1, "x"), b"\x00\xff", {1: "a"}, Pair(1, "b"), {(1, 2): {3}}, 2**80],
    ids=["set", "frozenset", "tuple", "bytes", "int-keys", "namedtuple", "nested", "bigint"],
)
def test_builtins_come_back_as_themselves_without_annotations(value: Any) -> None:
    clock = FakeClock()
    writer, reader, _ = pair_of_caches(clock)
    writer.sync.set("k", value)
    got = reader.sync.get_cached("k", never)
    assert got == value and type(got) is type(value)


def test_loader_annotation_types_the_value_in_another_process() -> None:
    clock = FakeClock()
    writer, reader, _ = pair_of_caches(clock)
    row = Row(1, True, (1, 2), Decimal("1.5"))

    def load() -> Row:
        return row

    assert writer.sync.get_cached("k", load) is row

    def read() -> Row:
        raise AssertionError("L2 should answer")

    got = reader.sync.get_cached("k", read)
    assert got == row and type(got) is Row


def test_a_user_class_without_a_declared_type_fails_the_write_clearly() -> None:
    writer, _, remote = pair_of_caches(FakeClock())
    with pytest.raises(SerializationError, match="without a declared type"):
        writer.sync.set("k", Row(1, True, (), Decimal(0)))
    with pytest.raises(SerializationError, match="declared type"):
        writer.sync.get_cached("k2", lambda: [Row(1, True, (), Decimal(0))])
    assert remote.store == {}


def test_a_reader_that_declares_no_type_gets_the_declared_class_too() -> None:
    clock = FakeClock()
    writer, reader, remote = pair_of_caches(clock)
    row = Row(1, True, (1, 2), Decimal("1.5"))
    writer.sync.set("k", row, value_type=Row)
    assert orjson.loads(remote.store["v:k"][0])["y"] == f"{Row.__module__}:Row"
    got = reader.sync.get("k")  # no value_type: the envelope names the class
    assert got == row and type(got) is Row
    assert type(reader.sync.get("k", value_type=Row)) is Row  # and L1 holds the Row


def test_a_typed_read_after_an_untyped_one_gets_its_type() -> None:
    clock = FakeClock()
    writer, reader, _ = pair_of_caches(clock)
    writer.sync.set("k", {1, 2})
    assert reader.sync.get("k") == {1, 2}
    assert type(reader.sync.get("k", value_type=set[int])) is set


def test_unresolvable_return_annotation_is_an_error_at_decoration() -> None:
    cache = TieredCache([MemoryTier(), FakeRemoteTier()], namespace="ann")
    with pytest.raises(ConfigurationError, match="return annotation"):

        @tiered_cache(cache)
        def f(x: int) -> OnlyForTypeCheckers[str, int]:  # only imported under TYPE_CHECKING
            raise AssertionError

    @dataclasses.dataclass
    class Local:  # a local class in a PEP 563 module resolves through the decorating scope
        x: int

    @tiered_cache(cache)
    def g(x: int) -> Local:
        return Local(x)

    assert g(1) == Local(1)


def test_a_return_type_that_cannot_be_rebuilt_is_an_error_at_decoration() -> None:
    cache = TieredCache([MemoryTier(), FakeRemoteTier()], namespace="ann")

    class Plain:
        pass

    with pytest.raises(ConfigurationError, match="cannot be cached"):

        @tiered_cache(cache)
        def f(x: int) -> Plain:
            raise AssertionError


BAD_RECORDS = [
    (Row, {"id": "not-a-number", "ok": True, "ids": {"$tuple": [1]}, "amount": {"$decimal": "1"}}),
    (Row, {"id": 1, "ok": "false", "ids": {"$tuple": [1]}, "amount": {"$decimal": "1"}}),
    (Row, {"id": 1, "ok": True, "ids": "123", "amount": {"$decimal": "1"}}),
    (Row, {"id": 1, "ok": True, "ids": {"$tuple": [1]}, "amount": {"$decimal": "1E+999999999"}}),
    (Row, {"id": 1, "ok": True, "ids": {"$tuple": [1]}, "amount": {"$decimal": "sNaN"}}),
    (Row, {"id": 1, "ok": True, "ids": {"$tuple": [1]}, "amount": {"$decimal": "1"}, "extra": 1}),
    (tuple[int, ...], "abc"),
    (int, 1.5),
    (list[int], [1, "2"]),
    (dict[int, str], {"1": "a"}),
    (Pair, {"$namedtuple": ["nowhere:Pair", [1, "b"]]}),
    (Any, {"$set": "abc"}),
    (Any, {"$nope": 1}),
    (Any, {"$bytes": "not base64!"}),
]


@pytest.mark.parametrize(("tp", "raw"), BAD_RECORDS, ids=[str(i) for i in range(len(BAD_RECORDS))])
def test_decoding_validates_and_a_mismatch_is_a_counted_corrupt_miss(tp: Any, raw: Any) -> None:
    clock = FakeClock()
    remote = FakeRemoteTier()
    cache = TieredCache([MemoryTier(), remote], clock=clock, namespace="bad")
    now = clock()
    doc = {"tc": 1, "k": "bad:k", "v": raw, "c": now, "f": now + 60, "s": now + 60, "t": [], "n": 1}
    remote.put_raw("bad:k", orjson.dumps(doc))
    loads: list[int] = []

    def load() -> Any:
        loads.append(1)
        return None

    cache.sync.get_cached("k", load, value_type=None if tp is Any else tp)
    assert loads == [1]  # treated as a miss
    assert cache.stats.tiers[1].corrupt == 1


def test_decimal_limits_on_write_too() -> None:
    with pytest.raises(SerializationError):
        encode_value(Decimal("1E+999999999"))
    with pytest.raises(SerializationError):
        encode_value(Decimal("NaN"))
    assert decode_value(encode_value(Decimal("-1.50"))) == Decimal("-1.50")


def test_tagged_form_is_plain_json_and_user_dicts_that_look_tagged_are_escaped() -> None:
    value = {"$set": [1]}
    encoded = encode_value(value)
    assert encoded == {"$dict": {"$set": [1]}}
    assert decode_value(orjson.loads(orjson.dumps(encoded))) == value
    assert encode_value({1: "a"}) == {"$map": [[1, "a"]]}
    assert encode_value((1, {2})) == {"$tuple": [1, {"$set": [2]}]}


def test_converter_for_is_cached_and_reports_its_type() -> None:
    assert converter_for(list[Row]) is converter_for(list[Row])
    assert converter_for(Row).tp is Row


def test_a_codec_with_an_entry_holding_a_local_enum_refuses_the_write() -> None:
    import enum

    class Local(enum.Enum):
        A = 1

    with pytest.raises(SerializationError, match="inside a function"):
        JsonCodec().dumps(TieredCache([MemoryTier()]).policy.new_entry("k", Local.A, 0.0))


# --- methods --------------------------------------------------------------------------------------


def test_methods_key_on_the_instance_and_bind_their_helpers() -> None:
    cache = TieredCache([MemoryTier()], namespace="m")

    class Repo:
        def __init__(self, db: str) -> None:
            self.db = db

        def __cache_key__(self) -> str:
            return self.db

        @tiered_cache(cache)
        def get(self, item: int) -> str:
            return f"{self.db}/{item}"

        @tiered_cache(cache, key="repo:{self.db}:{item}")
        async def aget(self, item: int) -> str:
            return f"{self.db}/{item}"

    a, b = Repo("db-a"), Repo("db-b")
    assert a.get(1) == "db-a/1" and b.get(1) == "db-b/1"
    assert a.get.cache_key(1) != b.get.cache_key(1)
    assert a.aget.cache_key(1) == "m:repo:db-a:1"
    assert asyncio.run(b.aget(1)) == "db-b/1"
    assert a.get.lookup(1).source == "L1"
    a.get.invalidate(1)
    assert a.get.lookup(1).source == "LOADED"
    asyncio.run(a.aget.invalidate(1))
    assert asyncio.run(a.aget.lookup(1)).source == "LOADED"
    assert Repo.get(a, 2) == "db-a/2"  # through the class, as a function
    assert list(inspect.signature(a.get).parameters) == ["item"]
    assert list(inspect.signature(Repo.get).parameters) == ["self", "item"]
    assert a.get.__name__ == "get"
    assert a.get.uncached(3) == "db-a/3"


def test_classmethods_key_on_their_class() -> None:
    cache = TieredCache([MemoryTier()], namespace="cm")

    class Base:
        @classmethod
        @tiered_cache(cache)
        def name(cls, x: int) -> str:
            return f"{cls.__name__}{x}"

    class Child(Base):
        pass

    assert Base.name(1) == "Base1"
    assert Child.name(1) == "Child1"


def test_a_method_without_an_instance_key_fails_when_its_class_is_created() -> None:
    cache = TieredCache([MemoryTier()], namespace="m")
    # Python 3.12+ raises __set_name__'s error as is; older versions wrap it in a RuntimeError
    with pytest.raises((RuntimeError, ConfigurationError)) as info:

        class Repo:
            @tiered_cache(cache)
            def get(self, item: int) -> int:
                return item

    error = info.value if isinstance(info.value, ConfigurationError) else info.value.__cause__
    assert isinstance(error, ConfigurationError)
    assert "__cache_key__" in str(error)


# --- keys -----------------------------------------------------------------------------------------


def test_template_fields_are_escaped_so_argument_tuples_never_share_a_key() -> None:
    cache = TieredCache([MemoryTier()], namespace="k")

    @tiered_cache(cache, key="doc:{org}:{doc_id}")
    def doc(org: str, doc_id: str) -> str:
        return f"{org}|{doc_id}"

    assert doc.cache_key("acme:secret", "x") != doc.cache_key("acme", "secret:x")
    assert doc("acme:secret", "x") == "acme:secret|x"
    assert doc("acme", "secret:x") == "acme|secret:x"
    assert doc.cache_key("a%3Ab", "c") != doc.cache_key("a:b", "c")

    @tiered_cache(cache, key="d:{org!r}:{doc_id}")  # the str.format path escapes too
    def doc2(org: str, doc_id: str) -> str:
        return org

    assert doc2.cache_key("a:b", "c") != doc2.cache_key("a", "b:c")


def test_templates_whose_fields_could_run_together_are_refused() -> None:
    cache = TieredCache([MemoryTier()], namespace="k")
    with pytest.raises(ConfigurationError, match="separator"):

        @tiered_cache(cache, key="{a}{b}")
        def f(a: str, b: str) -> str:
            return a

    @tiered_cache(cache, key="{a}x{b}7{c}")  # any character separates, letters and digits too
    def g(a: str, b: str, c: int) -> str:
        return a

    assert g.cache_key("ax", "b", 1) != g.cache_key("a", "xb", 1)
    assert g.cache_key("a", "b7", 1) != g.cache_key("a", "b", 71)
    assert g.cache_key("a", "b", 17) != g.cache_key("a", "b71", 7)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({1: "a"}, {"1": "a"}),
        (uuid.UUID(int=1), str(uuid.UUID(int=1))),
        (dt.date(2026, 1, 2), "2026-01-02"),
        (Decimal("1.5"), "1.5"),
        ((1, 2), [1, 2]),
        ({1, 2}, [1, 2]),
        (b"ab", "ab"),
        (1, 1.0),
        (True, 1),
    ],
    ids=[
        "int-vs-str-keys",
        "uuid",
        "date",
        "decimal",
        "tuple-list",
        "set-list",
        "bytes",
        "int-float",
        "bool",
    ],
)
def test_the_default_key_is_typed(one: Any, other: Any) -> None:
    cache = TieredCache([MemoryTier()], namespace="k")

    @tiered_cache(cache)
    def f(x: Any) -> str:
        return repr(x)

    assert f.cache_key(one) != f.cache_key(other)
    assert f(one) == repr(one) and f(other) == repr(other)


def test_the_default_key_of_equal_dicts_and_sets_does_not_depend_on_order() -> None:
    cache = TieredCache([MemoryTier()], namespace="k")

    @tiered_cache(cache)
    def f(x: Any) -> int:
        return 1

    assert f.cache_key({1: "a", 2: "b"}) == f.cache_key({2: "b", 1: "a"})
    assert f.cache_key({"a": 1, "b": 2}) == f.cache_key({"b": 2, "a": 1})
    assert f.cache_key({3, 1, 2}) == f.cache_key({1, 2, 3})


class Sub(str):
    pass


def test_key_checks_apply_to_str_subclasses() -> None:
    with pytest.raises(InvalidKeyError):
        check_key(Sub(""))
    with pytest.raises(InvalidKeyError):
        check_key(Sub("x" * 10_000))
    got = check_key(Sub("ok"))
    assert got == "ok" and type(got) is str


# --- tiers belong to one cache --------------------------------------------------------------------


def test_a_remote_tier_cannot_be_bound_to_a_second_cache() -> None:
    from tiercache.signing import SignedCodec

    remote = FakeRemoteTier()
    signed = TieredCache([MemoryTier(), remote], codec=SignedCodec([b"k" * 32]), namespace="s")
    with pytest.raises(ConfigurationError, match="already belongs"):
        TieredCache([remote], namespace="plain")
    signed.sync.set("k", 1)
    assert signed.sync.get("k") == 1
    twice = FakeRemoteTier()
    with pytest.raises(ConfigurationError, match="twice"):
        TieredCache([twice, twice])


def test_a_tier_of_a_dropped_cache_can_be_bound_again() -> None:
    import gc

    remote = FakeRemoteTier()
    TieredCache([remote], namespace="a")
    gc.collect()
    TieredCache([remote], namespace="b").sync.set("k", 1)


def test_an_in_process_tier_may_be_shared_by_caches_on_one_clock_only() -> None:
    clock = FakeClock()
    memory = MemoryTier()
    a = TieredCache([memory], clock=clock, namespace="a")
    TieredCache([memory], clock=clock, namespace="b")
    with pytest.raises(ConfigurationError):
        TieredCache([memory], clock=FakeClock(), namespace="c")
    assert a.sync.get("x") is None


def test_tags_that_are_str_subclasses_become_plain_strings() -> None:
    cache = TieredCache([MemoryTier(), FakeRemoteTier()], namespace="tg")
    cache.sync.set("k", 1, tags=[Sub("users")])
    entry = cache._rt.tiers[1].get("tg:k")  # type: ignore[attr-defined]
    assert entry is not None and entry.tags == ("users",) and type(entry.tags[0]) is str
    with pytest.raises(ConfigurationError):
        cache.sync.set("k", 1, tags=[Sub("")])


def test_tiered_cache_many_resolves_its_annotation_at_decoration_too() -> None:
    from tiercache import tiered_cache_many

    cache = TieredCache([MemoryTier(), FakeRemoteTier()], namespace="many")
    with pytest.raises(ConfigurationError, match="return annotation"):

        @tiered_cache_many(cache, key="x:{}")
        def bad(ids: list[int]) -> dict[int, OnlyForTypeCheckers[str, int]]:
            raise AssertionError

    @tiered_cache_many(cache, key="r:{}")
    def rows(ids: list[int]) -> dict[int, Row]:
        return {i: Row(i, True, (i,), Decimal(i)) for i in ids}

    assert rows([1, 2]) == {1: Row(1, True, (1,), Decimal(1)), 2: Row(2, True, (2,), Decimal(2))}


def test_a_memory_only_cache_takes_any_annotation() -> None:
    class Plain:
        pass

    cache = TieredCache([MemoryTier()], namespace="mem")
    made = Plain()

    @tiered_cache(cache)
    def f(x: int) -> Plain:
        return made

    assert f(1) is made and f(1) is made

    def load() -> Plain:
        return made

    assert cache.sync.get_cached("k", load) is made  # an unconvertible loader annotation: undeclared
