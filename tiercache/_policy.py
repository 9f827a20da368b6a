"""Per-call options resolved once: lifetimes, tags, value type, freshness and failure behaviour."""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass, fields, replace
from typing import Any

from ._entry import Entry
from ._errors import ConfigurationError
from ._serde import Converter
from ._ttl import seconds

__all__ = ["Policy"]


@dataclass(frozen=True, slots=True)
class Policy:
    """How one ``get_cached`` treats its key. Built by the cache from its defaults and overrides.

    ``ttl`` seconds fresh, then ``stale_ttl`` seconds stale (kept for SWR and fail-safe).
    ``swr``: serve a stale entry at once and refresh in the background.
    ``fail_safe``: serve a stale entry when the loader fails or passes ``soft_timeout``, and do not
    retry the loader for ``fail_safe_throttle`` seconds.
    ``hard_timeout``: give up on the loader (cancel it when async) and raise LoaderTimeoutError.
    ``early_refresh_beta``: XFetch's beta (0 disables); ``early_refresh_ratio``: refresh once this
    fraction of the fresh period has passed (0 disables). ``jitter``: +-fraction applied to ``ttl``.
    """

    ttl: float
    stale_ttl: float = 0.0
    tags: tuple[str, ...] = ()
    converter: Converter | None = None
    swr: bool = False
    fail_safe: bool = True
    fail_safe_throttle: float = 5.0
    soft_timeout: float | None = None
    hard_timeout: float | None = None
    early_refresh_beta: float = 0.0
    early_refresh_ratio: float = 0.0
    jitter: float = 0.0
    lease_ttl: float = 10.0
    lease_wait: float = 5.0

    def __post_init__(self) -> None:
        for name in _DURATIONS:  # "1h", timedelta(minutes=5), 90 -> float seconds
            value = getattr(self, name)
            if value is not None and type(value) is not float:
                object.__setattr__(self, name, seconds(value, name))
        if not self.ttl > 0:
            raise ConfigurationError(f"ttl must be a positive number of seconds, not {self.ttl!r}")
        if self.stale_ttl < 0:
            raise ConfigurationError("stale_ttl must be >= 0")
        if not 0 <= self.jitter < 1:
            raise ConfigurationError("jitter must be in [0, 1)")
        for name in ("soft_timeout", "hard_timeout"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigurationError(f"{name} must be positive")
        if isinstance(self.tags, str):
            raise ConfigurationError("tags must be a tuple of strings, not one string")
        if self.early_refresh_beta < 0 or not 0 <= self.early_refresh_ratio < 1:
            raise ConfigurationError("early_refresh_beta must be >= 0 and early_refresh_ratio in [0, 1)")
        if self.fail_safe_throttle < 0:
            raise ConfigurationError("fail_safe_throttle must be >= 0")

    @classmethod
    def build(cls, **options: Any) -> Policy:
        """A policy from user-facing options (durations parsed, unknown names listed)."""
        _check_names(options)
        return cls(**options)

    def with_overrides(self, **overrides: Any) -> Policy:
        """A policy with the non-None ``overrides`` applied (None means: keep the default)."""
        _check_names(overrides)
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "tags" in changes:
            changes["tags"] = tuple(changes["tags"])
        return replace(self, **changes) if changes else self

    def fresh_ttl(self) -> float:
        """The fresh period for one new entry, with jitter applied."""
        if self.jitter:
            return self.ttl * (1.0 + random.uniform(-self.jitter, self.jitter))
        return self.ttl

    def new_entry(
        self,
        key: str,
        value: Any,
        now: float,
        *,
        created_at: float | None = None,
        version: int = 0,
        delta: float = 0.0,
    ) -> Entry:
        """An entry for ``value`` written at ``now`` under this policy (jitter applied)."""
        fresh_until = now + self.fresh_ttl()
        return Entry(
            key,
            value,
            created_at=now if created_at is None else created_at,
            fresh_until=fresh_until,
            stale_until=fresh_until + self.stale_ttl,
            tags=self.tags,
            version=version,
            delta=delta,
            vtype=None if self.converter is None else self.converter.tp,
        )

    @property
    def early_refresh(self) -> bool:
        return bool(self.early_refresh_beta or self.early_refresh_ratio)

    def wants_early_refresh(self, entry: Entry, now: float, rand: float | None = None) -> bool:
        """Should this hit on a still-fresh entry start a background refresh?

        Fixed fraction: once ``early_refresh_ratio`` of the fresh period has passed. XFetch
        (Vattani et al., VLDB 2015): when ``now - delta * beta * ln(rand) >= fresh_until``, with
        ``delta`` the duration of the load that produced the entry; the chance per hit is
        ``exp(-(fresh_until - now) / (beta * delta))``, so only the last few ``delta`` before
        expiry see refreshes, and only hot keys get them.
        """
        ratio = self.early_refresh_ratio
        if ratio and now >= entry.created_at + ratio * (entry.fresh_until - entry.created_at):
            return True
        if self.early_refresh_beta and entry.delta > 0:
            r = random.random() if rand is None else rand
            return now - entry.delta * self.early_refresh_beta * math.log(max(r, 1e-300)) >= entry.fresh_until
        return False


# The options given in seconds, which also take a timedelta or a string ("90s", "5m", "1h", "1d").
_DURATIONS = (
    "ttl",
    "stale_ttl",
    "fail_safe_throttle",
    "soft_timeout",
    "hard_timeout",
    "lease_ttl",
    "lease_wait",
)
_NAMES = frozenset(f.name for f in fields(Policy))
# What callers spell: value_type= becomes the converter.
_OPTIONS = sorted((_NAMES - {"converter"}) | {"value_type"})


def _check_names(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - _NAMES)
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, _OPTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigurationError(
            f"unknown cache option {name!r}{hint}; the options are: {', '.join(_OPTIONS)}"
        )
