"""CloudflareKVTier against the tier contract, on the validating fake KV server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.cloudflare_kv.conftest import tier_factory
from tests.kv_fake import FakeKV
from tiercache.adapters.cloudflare_kv import CloudflareKVTier
from tiercache.testing import TierContract


def _checked(fake: FakeKV) -> None:
    assert fake.violations == []
    assert fake.stats.write_rate_violations == 0
    assert fake.stats.budget_exceeded == 0


@pytest.fixture(scope="module")
def kv_contract_fake() -> Iterator[FakeKV]:
    """Cloudflare's real pacing: one write per key per second."""
    with FakeKV() as fake:
        yield fake
    _checked(fake)


@pytest.fixture(scope="module")
def kv_fast_fake() -> Iterator[FakeKV]:
    """A fake that allows a write per key every 0.1 s, so parked writes drain fast."""
    with FakeKV(write_interval=0.1) as fake:
        yield fake
    _checked(fake)


class TestCloudflareKVTier(TierContract):
    shared_storage = True
    keeps_tombstones = True  # in-process only (see the tier's docstring)

    @pytest.fixture
    def make_tier(self, kv_contract_fake: FakeKV) -> Callable[[], CloudflareKVTier]:
        return tier_factory(kv_contract_fake)


class TestCloudflareKVTierWithMetadataNoBulkGet(TierContract):
    """The multipart (value + metadata) write path, single reads instead of bulk get, fast pacing."""

    shared_storage = True
    keeps_tombstones = True

    @pytest.fixture
    def make_tier(self, kv_fast_fake: FakeKV) -> Callable[[], CloudflareKVTier]:
        return tier_factory(kv_fast_fake, write_metadata=True, bulk_get=False, write_interval=0.3)
