"""Stops the Django backend's process-wide caches after this folder's tests (their bus heartbeats
would otherwise keep publishing on the shared servers while later tests count commands or memory)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="module")
def _close_shared_backend_caches() -> Iterator[None]:
    yield
    from tiercache.contrib import django as backend

    with backend._shared_lock:
        states = list(backend._shared.values())
        backend._shared.clear()
    for state in states:
        state.cache.sync.close()
