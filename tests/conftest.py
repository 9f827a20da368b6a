"""Shared fixtures: real Redis servers (the shared one on :6379, ones the tests start and stop)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.redis_servers import RedisClusterProcesses, RedisServer, ping

SHARED_REDIS_PORT = 6379


@pytest.fixture(scope="session")
def shared_redis_url() -> str:
    """The shared server CI provides. It must answer: real-Redis tests never skip silently."""
    if not ping(SHARED_REDIS_PORT, timeout=1.0):
        pytest.fail(f"no Redis answers on 127.0.0.1:{SHARED_REDIS_PORT}; start redis-server (see .ci/run)")
    return f"redis://127.0.0.1:{SHARED_REDIS_PORT}/0"


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to one test, so the shared server needs no flushing."""
    return f"tctest-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """A real local 3-master Redis Cluster, started once per test session, stopped by PID."""
    cluster = RedisClusterProcesses(masters=3).start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A standalone redis-server this test owns: it may kill, restart or count commands on it."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()
