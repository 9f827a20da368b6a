"""tiercache beside its peers (cachetools, cachebox, lru_cache, dogpile, cashews, aiocache, raw redis-py).

Run: ``.venv/bin/python -m pytest benchmarks/test_peers.py --benchmark-enable`` (needs ``.[bench]``
and ``redis-server`` on the PATH; a private server is started on a free loopback port). One
pytest-benchmark group per scenario with one baseline each; the session ends with the ratio table
of ``conftest.py``. Counts (stampede, round trips) and import times are tests that print. For the
interleaved, repeated run that writes ``docs/benchmarks.md``, use ``python benchmarks/report.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import _peers as peers
import pytest

BUILDERS: dict[str, Callable[[peers.OwnRedis], peers.Scenario]] = {
    "sync_l1_hit": lambda server: peers.sync_l1_hit(),
    "async_l1_hit": lambda server: peers.async_l1_hit(),
    "l2_hit": peers.l2_hit,
    "l2_concurrent": peers.l2_concurrent,
    "get_many": peers.get_many,
}

PARAMS = [
    pytest.param(key, group, member, id=f"{group.name}::{member}")
    for key, groups in peers.GROUPS.items()
    for group in groups
    for member in group.members
]


@pytest.fixture(scope="module")
def server() -> Iterator[peers.OwnRedis]:
    with peers.own_redis() as srv:
        yield srv


@pytest.fixture(scope="module")
def scenarios(server: peers.OwnRedis) -> Iterator[dict[str, peers.Scenario]]:
    built: dict[str, peers.Scenario] = {}
    yield built
    for scenario in built.values():
        scenario.close()


def _scenario(key: str, server: peers.OwnRedis, built: dict[str, peers.Scenario]) -> peers.Scenario:
    if key == "get_many" and not peers.has_get_many_cached():
        pytest.skip("TieredCache.get_many_cached does not exist yet")
    if key not in built:
        built[key] = BUILDERS[key](server)
    return built[key]


@pytest.mark.parametrize(("key", "group", "member"), PARAMS)
def test_peer(
    key: str, group: peers.Group, member: str, measure: Any, server: peers.OwnRedis, scenarios: Any
) -> None:
    case = _scenario(key, server, scenarios).cases[member]
    measure(case.run, group=group.name, baseline=member == group.baseline, per_call=case.per_call)


def test_probes(server: peers.OwnRedis, scenarios: Any) -> None:
    """Facts beside the timings: loader calls in the concurrent run, round trips of get_many."""
    for key in ("l2_concurrent", "get_many"):
        if key == "get_many" and not peers.has_get_many_cached():
            continue
        scenario = _scenario(key, server, scenarios)
        for what, probe in scenario.probes.items():
            print(f"\n{scenario.title}: {what}: {probe()}")


def test_stampede(server: peers.OwnRedis) -> None:
    """100 callers of one cold key with a 50 ms loader: loader calls and Redis commands per waiter."""
    print()
    for r in peers.stampede(server):
        print(
            f"  {r.name:45s} loads={r.loader_calls:3d} commands={r.total_commands:4d} "
            f"({r.total_commands / peers.STAMPEDE_CALLERS:.2f}/waiter) {r.seconds * 1e3:6.0f} ms "
            f"errors={r.errors} {r.commands}"
        )
        if r.name.startswith("tiercache"):
            assert r.loader_calls == 1 and r.errors == 0


def test_import_time() -> None:
    """``import tiercache`` beside ``import json`` in fresh interpreters (target: <= 3x)."""
    print()
    for what, value in peers.import_times(reps=7).items():
        print(f"  {what:40s} {value:10.1f}")
