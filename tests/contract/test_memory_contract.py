"""MemoryTier against the tier contract."""

from collections.abc import Callable

import pytest

from tiercache.adapters.memory import MemoryTier
from tiercache.testing import FakeRemoteTier, TierContract


class TestMemoryTier(TierContract):
    @pytest.fixture
    def make_tier(self) -> Callable[[], MemoryTier]:
        return lambda: MemoryTier(max_entries=1000)


class TestMemoryTierWithMaxTTL(TierContract):
    @pytest.fixture
    def make_tier(self) -> Callable[[], MemoryTier]:
        return lambda: MemoryTier(max_entries=1000, max_ttl=30)


class TestFakeRemoteTier(TierContract):
    """The test double used by the core's own tests must honour the contract too."""

    shared_storage = True

    @pytest.fixture
    def make_tier(self) -> Callable[[], FakeRemoteTier]:
        store: dict[str, tuple[bytes, float]] = {}
        return lambda: FakeRemoteTier(store)
