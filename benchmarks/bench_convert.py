"""Typed decoding: tiercache's converter vs msgspec.convert vs pydantic's TypeAdapter.

Each turns the decoded JSON of a cached value back into a typed, validated value. tiercache's
input is its tagged form (sets, tuples, Decimals... tagged); msgspec and pydantic get the plain
JSON form they expect for the same value. Run: ``python benchmarks/bench_convert.py``.
Import times are measured in fresh interpreters (``-X importtime`` not needed: wall clock of
``import x``, best of 5).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics
import subprocess
import sys
import timeit
from decimal import Decimal

import orjson


@dataclasses.dataclass
class Address:
    city: str
    since: dt.date


@dataclasses.dataclass
class User:
    id: int
    name: str
    tags: set[str]
    balance: Decimal
    addresses: list[Address]


def value(n: int) -> User:
    return User(
        1,
        "Ada",
        {"a", "b", "c"},
        Decimal("12.50"),
        [Address(f"c{i}", dt.date(2020, 1, 1 + i % 28)) for i in range(n)],
    )


def import_time(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [float(subprocess.check_output([sys.executable, "-c", code])) for _ in range(5)]
    return min(runs) * 1000


def main() -> None:
    from tiercache._serde import converter_for, encode_value

    results = {}
    for n in (1, 20):
        v = value(n)
        tagged = orjson.loads(orjson.dumps(encode_value(v, User)))
        plain = orjson.loads(orjson.dumps(v, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        ours = converter_for(User)
        assert ours(tagged) == v
        rows = {"tiercache": lambda f=ours, x=tagged: f(x)}
        try:
            import msgspec

            assert msgspec.convert(plain, User) == v
            rows["msgspec.convert"] = lambda x=plain: msgspec.convert(x, User)
        except ImportError:
            pass
        try:
            import pydantic

            adapter = pydantic.TypeAdapter(User)
            assert adapter.validate_python(plain) == v
            rows["pydantic.TypeAdapter"] = lambda a=adapter, x=plain: a.validate_python(x)
        except ImportError:
            pass
        for name, fn in rows.items():
            times = timeit.repeat(fn, number=2000, repeat=7)
            results[(name, n)] = statistics.median(times) / 2000 * 1e6
    for (name, n), us in results.items():
        print(f"convert  {name:22s} {n:3d} addresses  {us:8.2f} us")
    for module in ("tiercache", "msgspec", "pydantic"):
        print(f"import   {module:22s} {import_time(module):8.1f} ms")


if __name__ == "__main__":
    main()
