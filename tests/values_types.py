"""Module-level types for the value round-trip tests (a fresh process finds them by name)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from decimal import Decimal
from typing import NamedTuple


class Color(enum.Enum):
    RED = "red"
    BLUE = 2


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Point(NamedTuple):
    x: int
    label: str


@dataclasses.dataclass(frozen=True)
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
    color: Color | None = None
    coords: tuple[int, int] | None = None
