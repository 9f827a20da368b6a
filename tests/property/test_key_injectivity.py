"""Keys never collide, property-tested: a ``key=`` template gives two argument tuples one key only
when their text is equal, and the default key of two values is one key only when they are equal
and of the same type (issue 15)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.property.test_value_roundtrip import builtins, same
from tiercache import TieredCache, tiered_cache
from tiercache.adapters.memory import MemoryTier

cache = TieredCache([MemoryTier()], namespace="inj")

SEPARATED = st.text(alphabet=":%-/|ab1 é%3A", max_size=8)


@tiered_cache(cache, key="doc:{org}:{doc_id}/{rev}")
def doc(org: Any, doc_id: Any, rev: Any) -> None:
    return None


@tiered_cache(cache, key="t{a}x{b}7{c}")  # letters and digits as separators
def lettered(a: Any, b: Any, c: Any) -> None:
    return None


@tiered_cache(cache, key="d-{a!s}-{b:>3}")  # conversions and specs take the nested path
def formatted(a: Any, b: Any) -> None:
    return None


@tiered_cache(cache)
def default(x: Any) -> None:
    return None


@settings(max_examples=400, deadline=None)
@given(
    st.tuples(SEPARATED, SEPARATED, st.one_of(SEPARATED, st.integers())),
    st.tuples(SEPARATED, SEPARATED, st.one_of(SEPARATED, st.integers())),
)
def test_template_keys_are_injective_on_field_text(one: tuple[Any, ...], other: tuple[Any, ...]) -> None:
    same_text = tuple(map(str, one)) == tuple(map(str, other))
    assert (doc.cache_key(*one) == doc.cache_key(*other)) == same_text


LETTERS = st.one_of(st.text(alphabet="x7%a1-", max_size=6), st.integers(-100, 100))


@settings(max_examples=400, deadline=None)
@given(st.tuples(LETTERS, LETTERS, LETTERS), st.tuples(LETTERS, LETTERS, LETTERS))
def test_letter_and_digit_separators_keep_keys_injective(
    one: tuple[Any, ...], other: tuple[Any, ...]
) -> None:
    same_text = tuple(map(str, one)) == tuple(map(str, other))
    assert (lettered.cache_key(*one) == lettered.cache_key(*other)) == same_text


@settings(max_examples=300, deadline=None)
@given(st.tuples(SEPARATED, SEPARATED), st.tuples(SEPARATED, SEPARATED))
def test_formatted_template_keys_are_injective(one: tuple[str, str], other: tuple[str, str]) -> None:
    texts = (one[0], f"{one[1]:>3}"), (other[0], f"{other[1]:>3}")
    assert (formatted.cache_key(*one) == formatted.cache_key(*other)) == (texts[0] == texts[1])


@settings(max_examples=400, deadline=None)
@given(builtins, builtins)
def test_default_keys_differ_unless_the_values_are_the_same(one: Any, other: Any) -> None:
    # One key for two values only when they are equal and typed alike, all the way down. (Equal
    # values may still get two keys -- 0.0 and -0.0, one instant in two time zones: a miss, never
    # a wrong value.)
    if default.cache_key(one) == default.cache_key(other):
        assert same(one, other), (one, other)
    assert default.cache_key(one) == default.cache_key(one)
