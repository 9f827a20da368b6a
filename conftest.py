"""Repository-wide pytest hook: in CI a skipped real-Redis test is a failure, never a silent pass."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

REAL_REDIS_FIXTURES = {"shared_redis_url", "redis_server", "redis_cluster"}
NOT_APPLICABLE = "not applicable: "  # contract tests that do not apply to a tier say so


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and os.environ.get("TIERCACHE_REQUIRE_REDIS")):
        return
    needs_redis = item.get_closest_marker("redis") is not None or bool(
        REAL_REDIS_FIXTURES & set(getattr(item, "fixturenames", ()))
    )
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if needs_redis and NOT_APPLICABLE not in reason:
        report.outcome = "failed"
        report.longrepr = f"a test that needs real Redis was skipped in CI: {reason}"
