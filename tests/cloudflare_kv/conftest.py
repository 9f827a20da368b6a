"""Fixtures for the Cloudflare KV tests: the validating fake server and tiers pointed at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.kv_fake import ACCOUNT_ID, NAMESPACE_ID, TOKEN, FakeKV
from tiercache.adapters.cloudflare_kv import CloudflareKVTier


@pytest.fixture(scope="session")
def kv_fake() -> Iterator[FakeKV]:
    """One fake for the session (a missing OpenAPI file fails here; it is never skipped)."""
    with FakeKV() as fake:
        yield fake


@pytest.fixture
def fake(kv_fake: FakeKV) -> Iterator[FakeKV]:
    """The session fake; the test fails if its traffic broke the OpenAPI description or a limit."""
    seen = len(kv_fake.violations)
    before = (kv_fake.stats.write_rate_violations, kv_fake.stats.retry_after_violations)
    yield kv_fake
    assert kv_fake.violations[seen:] == []
    assert (kv_fake.stats.write_rate_violations, kv_fake.stats.retry_after_violations) == before
    assert kv_fake.stats.budget_exceeded == 0


def tier_factory(fake: FakeKV, **options: Any) -> Callable[[], CloudflareKVTier]:
    def make() -> CloudflareKVTier:
        return CloudflareKVTier(
            account_id=ACCOUNT_ID,
            namespace_id=NAMESPACE_ID,
            api_token=TOKEN,
            base_url=fake.base_url,
            **options,
        )

    return make
