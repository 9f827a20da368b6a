"""Small things the supported Pythons (3.10+) do not all have."""

from __future__ import annotations

from typing import NoReturn

__all__ = ["assert_never"]


def assert_never(value: NoReturn) -> NoReturn:
    """The end of an exhaustive ``match``: mypy rejects the call if a case is missing."""
    raise AssertionError(f"unhandled command {value!r}")
