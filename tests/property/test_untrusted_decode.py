"""Fuzzed records against declared types: any JSON a tier can hold, tags and class names included,
decodes to a value or raises SerializationError (a counted corrupt miss), never anything else."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import typing
import uuid
from decimal import Decimal
from typing import Any, Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.values_types import Address, Color, Point, User
from tiercache._entry import Entry
from tiercache._serde import SerializationError, convert_entry, converter_for


@dataclasses.dataclass
class Node:
    v: int
    kids: list[Node]


TYPES: list[Any] = [
    *(int, str, bool, float, bytes, Decimal, uuid.UUID, dt.date, dt.datetime, dt.time, dt.timedelta),
    *(list[int], dict[str, int], dict[int, str], set[int], frozenset[str], tuple[int, ...]),
    *(tuple[int, str], tuple[()], set[tuple[int, int]], dict[str, list[tuple[int, ...]]]),
    *(int | None, int | str, Literal[1, "a", True], list[Point | None], list[User]),
    *(User, Point, Color, Address, Node, typing.Sequence[int], typing.Mapping[str, Any], Any, None),
]
TAGS = ["$tuple", "$set", "$frozenset", "$map", "$dict", "$bytes", "$int", "$datetime", "$date"]
TAGS += ["$time", "$timedelta", "$decimal", "$uuid", "$enum", "$namedtuple", "$obj", "$x"]
TEXTS = ["tests.values_types:Color", "tests.values_types:Point", "os:system", "builtins:eval"]
TEXTS += ["1E+999999999", "sNaN", "2020-01-01", "-5", "1" * 5000, f"{__name__}:Node"]
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.sampled_from(TEXTS),
)
documents = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=4), inner, max_size=3),
        st.builds(lambda tag, body: {tag: body}, st.sampled_from(TAGS), inner),
    ),
    max_leaves=20,
)


def decode(tp: Any, raw: Any, y: str | None = None) -> None:
    entry = Entry("k", raw, created_at=0.0, fresh_until=1.0, stale_until=1.0, typed=False, vtype=y)
    with contextlib.suppress(SerializationError):
        convert_entry(entry, None if tp is Any else converter_for(tp))


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(TYPES), documents, st.sampled_from([None, "tests.values_types:User", "os:system"]))
def test_any_record_decodes_or_is_a_serialization_error(tp: Any, raw: Any, y: str | None) -> None:
    decode(tp, raw, y)


def test_deep_records_are_serialization_errors() -> None:
    raw: Any = 1
    for _ in range(5000):
        raw = [raw]
    for tp in (Any, list, Node, list[Any]):
        decode(tp, raw)
    raw = {"v": 1, "kids": []}
    for _ in range(3000):
        raw = {"v": 1, "kids": [raw]}
    decode(Node, raw)
    raw = {"$tuple": 1}
    for _ in range(3000):
        raw = {"$tuple": [raw]}
    decode(tuple[Any, ...], raw)
