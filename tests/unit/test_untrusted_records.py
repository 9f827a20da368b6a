"""Records are untrusted input: whoever can write Redis or KV controls the class names a record
holds (the tagged ``$enum``/``$namedtuple`` forms, the envelope's ``y``). A reader must never run
code of a class it did not declare, never import, never trigger ``__getattr__`` hooks while looking
a name up, and every bad record is a counted corrupt miss, not an exception."""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Any

import orjson
import pytest

from tiercache import EventKind, TieredCache
from tiercache._serde import decode_value
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeClock, FakeRemoteTier

CALLS: list[str] = []
HERE = __name__


@dataclasses.dataclass
class Gadget:
    """An imported dataclass nobody declared as a value type, with a side effect on construction."""

    path: str

    def __post_init__(self) -> None:
        CALLS.append(f"Gadget({self.path})")


@dataclasses.dataclass
class Declared:
    n: int


class SneakyTuple(collections.namedtuple("SneakyTuple", "a b")):
    """A namedtuple subclass whose constructor has a side effect."""

    def __new__(cls, a: Any, b: Any) -> SneakyTuple:
        CALLS.append(f"SneakyTuple({a}, {b})")
        return super().__new__(cls, a, b)


class Lazy:
    """An object whose attribute look-ups run code (like a lazy settings proxy)."""

    def __getattr__(self, name: str) -> Any:
        CALLS.append(f"Lazy.{name}")
        raise RuntimeError("looked up")


lazy = Lazy()


class Mood(enum.Enum):
    OK = 1

    @classmethod
    def _missing_(cls, value: object) -> Any:
        raise RuntimeError(f"no mood {value!r}")


@pytest.fixture(autouse=True)
def _clear() -> None:
    CALLS.clear()


def envelope(key: str, value: Any, **extra: Any) -> bytes:
    doc = {"tc": 1, "k": key, "v": value, "c": 0.0, "f": 1e12, "s": 1e12, "t": [], "n": 1, "d": 0.0}
    doc.update(extra)
    return orjson.dumps(doc)


def reader() -> tuple[TieredCache, FakeRemoteTier, list[Any]]:
    clock = FakeClock()
    remote = FakeRemoteTier()
    events: list[Any] = []
    cache = TieredCache([MemoryTier(), remote], clock=clock, namespace="u", on_event=events.append)
    return cache, remote, events


def plant(remote: FakeRemoteTier, key: str, data: bytes) -> None:
    remote.store[f"u:{key}"] = (data, 1e12)


def corrupt(events: list[Any]) -> int:
    return sum(1 for e in events if e.kind is EventKind.CORRUPT)


def test_y_naming_an_undeclared_dataclass_runs_none_of_its_code() -> None:
    cache, remote, _ = reader()
    plant(remote, "k", envelope("u:k", {"path": "/etc/passwd"}, y=f"{HERE}:Gadget"))
    got = cache.sync.get("k")
    assert CALLS == []  # never constructed
    assert got == {"path": "/etc/passwd"}  # the plain value, as without a declared class


def test_y_naming_a_declared_class_still_rebuilds_it() -> None:
    cache, remote, events = reader()
    cache.sync.set("w", Declared(1), value_type=Declared)  # declares Declared in this process
    plant(remote, "k", envelope("u:k", {"n": 2}, y=f"{HERE}:Declared"))
    assert cache.sync.get("k") == Declared(2)
    plant(remote, "bad", envelope("u:bad", {"n": "two"}, y=f"{HERE}:Declared"))
    assert cache.sync.get("bad") is None and corrupt(events) == 1


def test_namedtuple_by_name_runs_no_constructor() -> None:
    value = decode_value({"$namedtuple": [f"{HERE}:SneakyTuple", [1, 2]]})
    assert CALLS == []
    assert type(value) is SneakyTuple and tuple(value) == (1, 2)
    with pytest.raises(Exception) as info:
        decode_value({"$namedtuple": [f"{HERE}:SneakyTuple", [1, 2, 3]]})
    assert type(info.value).__name__ == "SerializationError"


@pytest.mark.parametrize(
    "tagged",
    [
        {"$enum": [f"{HERE}:lazy.Anything", 1]},
        {"$namedtuple": [f"{HERE}:lazy.Anything", [1]]},
        {"$enum": [f"{HERE}:NoSuchName", 1]},  # module-level __getattr__ is not consulted either
        {"$enum": [f"{HERE}:Mood", 2]},  # _missing_ raises a RuntimeError
        {"$enum": [f"{HERE}:Gadget", 1]},
        {"$namedtuple": [f"{HERE}:Gadget", ["x"]]},
    ],
)
def test_bad_class_names_are_corrupt_misses_that_run_no_lookup_hooks(tagged: Any) -> None:
    cache, remote, events = reader()
    plant(remote, "k", envelope("u:k", tagged))
    assert cache.sync.get("k") is None
    assert corrupt(events) == 1
    assert [c for c in CALLS if c.startswith(("Lazy", "Gadget", "module"))] == []


def test_y_walking_through_a_lazy_object_is_a_plain_read() -> None:
    cache, remote, events = reader()
    plant(remote, "k", envelope("u:k", {"n": 1}, y=f"{HERE}:lazy.Anything"))
    assert cache.sync.get("k") == {"n": 1}
    assert CALLS == [] and corrupt(events) == 0


def __getattr__(name: str) -> Any:  # PEP 562: would import or build things lazily
    CALLS.append(f"module.{name}")
    raise AttributeError(name)


@dataclasses.dataclass(frozen=True)
class WithDerived:
    a: int
    double: int = dataclasses.field(init=False, default=0)
    notes: list[str] = dataclasses.field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "double", self.a * 2)


def test_a_dataclass_with_init_false_fields_round_trips() -> None:
    clock = FakeClock()
    remote = FakeRemoteTier()
    writer = TieredCache([MemoryTier(), remote], clock=clock, namespace="u")
    events: list[Any] = []
    cold = TieredCache(
        [MemoryTier(), FakeRemoteTier(remote.store)], clock=clock, namespace="u", on_event=events.append
    )
    value = WithDerived(3)
    value.notes.append("kept")  # a non-init field changed after construction: part of ==
    writer.sync.set("k", value, value_type=WithDerived)
    got = cold.sync.get("k", value_type=WithDerived)
    assert corrupt(events) == 0
    assert got == value and type(got) is WithDerived and got.double == 6 and got.notes == ["kept"]


class _LoudMeta(enum.EnumMeta):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        CALLS.append("LoudMeta.__call__")
        return super().__call__(*args, **kwargs)


class Loud(enum.Enum, metaclass=_LoudMeta):
    A = 1


class Perm(enum.Flag):
    R = 1
    W = 2


def test_enum_members_are_found_by_value_without_a_custom_metaclass_call() -> None:
    assert decode_value({"$enum": [f"{HERE}:Loud", 1]}) is Loud.A
    assert CALLS == []
    with pytest.raises(Exception) as info:
        decode_value({"$enum": [f"{HERE}:Loud", 5]})
    assert type(info.value).__name__ == "SerializationError" and CALLS == []
    assert decode_value({"$enum": [f"{HERE}:Perm", 3]}) == Perm.R | Perm.W  # a Flag's combination
