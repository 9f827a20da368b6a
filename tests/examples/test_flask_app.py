"""examples/flask_app.py through Flask's test client (sync decorator and cache.sync)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType


def test_sync_app(load_example: Callable[[str], ModuleType]) -> None:
    ex = load_example("flask_app")
    client = ex.app.test_client()
    first = client.get("/reports/eu/2026-01-15")
    assert first.status_code == 200
    assert first.get_json() == {"day": "2026-01-15", "region": "eu", "orders": 152}
    assert client.get("/reports/eu/2026-01-15").get_json() == first.get_json()
    assert client.get("/reports/us/2026-01-15").get_json()["orders"] == 152
    assert ex.reports_built["count"] == 2  # one per (day, region)

    ex.cache.tiers[0].clear()  # L1 gone: the Report comes back from Redis as a Report
    assert client.get("/reports/eu/2026-01-15").get_json() == first.get_json()
    assert ex.reports_built["count"] == 2

    assert client.post("/reports/eu/2026-01-15/refresh").status_code == 200
    assert ex.reports_built["count"] == 3

    assert client.get("/flags/beta-search").get_json() == {"enabled": True, "source": "LOADED"}
    assert client.get("/flags/beta-search").get_json() == {"enabled": True, "source": "L1"}
