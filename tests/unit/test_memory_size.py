"""MemoryTier's byte bound follows real memory: estimates within 25 % of tracemalloc's count for
nested values (keys and tags included), and max_bytes holds the tier near its budget."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import random
import tracemalloc
import uuid
from decimal import Decimal
from typing import Any

import pytest

from tiercache import ValueTooLargeError
from tiercache.adapters.memory import MemoryTier
from tiercache.testing import make_entry


@dataclasses.dataclass
class Person:
    name: str
    tags: list[str]
    at: dt.datetime


def value(i: int, kind: str) -> Any:
    r = random.Random(i)
    if kind == "dicts":
        return {
            "id": i + 1000,
            "name": f"user-{i}-{r.random()}",
            "scores": [r.random() for _ in range(20)],
            "nested": {f"k{j}": {"a": [j + 1000, str(j) * 5]} for j in range(10)},
        }
    if kind == "deep":  # deeper than the old walk's 4 levels
        v: Any = [i + 10**6]
        for d in range(50):
            v = [v, f"level{d}-{i}"]
        return v
    if kind == "wide":  # more items than the old walk's 1,000-item sample, of unequal sizes
        return [("x" * (j % 97)) + str(i) for j in range(5000)]
    if kind == "objects":
        return [
            Person(f"n{i}-{j}", [f"t{k}-{i}" for k in range(5)], dt.datetime(2020, 1, 1) + dt.timedelta(i, j))
            for j in range(10)
        ]
    return {
        "d": Decimal(i) / 7,
        "u": uuid.UUID(int=i),
        "s": {f"x{i}-{k}" for k in range(10)},
        "t": tuple(range(1000 + i, 1030 + i)),
        "b": b"x" * 300,
    }


@pytest.mark.parametrize("kind", ["dicts", "deep", "wide", "objects", "mixed"])
def test_the_estimate_is_within_25_percent_of_traced_memory(kind: str) -> None:
    count = 15 if kind == "wide" else 150
    tier = MemoryTier(max_entries=10**6)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            key = f"ns:{kind}:{i}:" + "k" * 40  # long keys and a tag per entry: counted too
            tier.set(key, make_entry(key, value(i, kind), 1e12, tags=(f"tag-{kind}-{i}",)))
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.75 <= tier.size_bytes / used <= 1.25, (tier.size_bytes, used)


def test_max_bytes_bounds_the_memory_really_held() -> None:
    limit = 400_000
    tier = MemoryTier(max_entries=10**6, max_bytes=limit)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1200):
            key = f"ns:{i}"
            tier.set(key, make_entry(key, value(i, "dicts"), 1e12))
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert tier.size_bytes <= limit
    assert used <= limit * 1.25 + 100_000  # plus the tier's own tables


def test_a_value_over_the_per_entry_limit_is_refused() -> None:
    tier = MemoryTier(max_bytes=10**6, max_value_bytes=10_000)
    with pytest.raises(ValueTooLargeError):
        tier.set("k", make_entry("k", [str(i) * 100 for i in range(200)], 1e12))
    assert len(tier) == 0
