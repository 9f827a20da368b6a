"""Durations as users write them: seconds, ``datetime.timedelta`` or ``"90s"``/``"5m"``/``"1h"``/``"1d"``."""

from __future__ import annotations

import math
import re
from datetime import timedelta

from ._errors import ConfigurationError

__all__ = ["Duration", "seconds"]

# What every ``ttl=``/``stale_ttl=``/timeout option accepts.
Duration = float | timedelta | str

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# one or more <number><unit> parts: "90s", "1.5h", "1h30m"
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_HINT = "seconds (a number), a datetime.timedelta or a string like '90s', '5m', '1h', '1d', '1h30m'"


def seconds(value: object, name: str = "ttl") -> float:
    """``value`` as a float number of seconds; ConfigurationError naming ``name`` if it is none.

    Only the spelling is checked here: whether zero or negative is allowed is the caller's rule.
    """
    if isinstance(value, bool):  # a bool is an int: ttl=True is a mistake, not one second
        raise ConfigurationError(f"{name} must be {_HINT}, not {value!r}")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if not _WHOLE.fullmatch(text):
            raise ConfigurationError(f"{name}={value!r} is not a duration: use {_HINT}")
        result = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(text))
    else:
        raise ConfigurationError(f"{name} must be {_HINT}, not {type(value).__name__} {value!r}")
    if math.isnan(result) or math.isinf(result):
        raise ConfigurationError(f"{name} must be a finite duration, not {value!r}")
    return result
