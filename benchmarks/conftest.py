"""Benchmark support: each group has one baseline, and the session ends with a table of ratios.

Machines are noisy, so only ratios measured in the same run are reported (ours / baseline, on the
median). Run: ``python -m pytest benchmarks --benchmark-enable`` (add ``-k`` to pick groups).
"""

from __future__ import annotations

from typing import Any

import pytest

_results: dict[str, dict[str, float]] = {}
_baselines: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "baseline: this benchmark is its group's baseline")


@pytest.fixture
def measure(benchmark: Any, request: pytest.FixtureRequest) -> Any:
    """``measure(fn, group=..., baseline=False, per_call=1)``: benchmark and record for the table."""

    def run(fn: Any, *, group: str, baseline: bool = False, per_call: int = 1) -> Any:
        benchmark.group = group
        result = benchmark(fn)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None with --benchmark-disable
            name = request.node.name
            _results.setdefault(group, {})[name] = stats.stats.median / per_call
            if baseline:
                _baselines[group] = name
        return result

    return run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _results:
        return
    tr = terminalreporter
    tr.section("tiercache ratios (median, same run; < 1 means faster than the baseline)")
    for group, rows in sorted(_results.items()):
        base_name = _baselines.get(group)
        base = rows.get(base_name) if base_name else None
        tr.write_line(f"[{group}]")
        for name, median in sorted(rows.items(), key=lambda kv: kv[1]):
            ratio = f"{median / base:6.2f}x" if base else "   n/a"
            mark = "  (baseline)" if name == base_name else ""
            tr.write_line(f"  {name:60s} {median * 1e9:12.0f} ns  {ratio}{mark}")
