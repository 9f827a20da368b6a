"""``python -m tiercache demo`` as the README runs it: with a Redis, and with none (embedded fakeredis)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXPECTED = [
    ("first call: cold everywhere", "A", "loader (L3)"),
    ("same call again", "A", "L1 memory"),
    ("another process, cold L1", "B", "L2 redis"),
    ("that process again", "B", "L1 memory"),
    ("after invalidate(42)", "A", "loader (L3)"),
    ("100 concurrent callers, cold key", "A", "loader x1"),
]


def run_demo(redis_url: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url, **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "tiercache", "demo"], env=env, capture_output=True, text=True, timeout=60
    )


def demo_output(redis_url: str) -> str:
    done = run_demo(redis_url)
    assert done.returncode == 0, done.stderr
    return done.stdout


def served_from(output: str) -> list[tuple[str, str, str]]:
    rows = []
    for label, _, _ in EXPECTED:
        line = next(line for line in output.splitlines() if line.startswith(label + " "))
        rest = line[len(label) :].split()
        rows.append((label, rest[0], " ".join(rest[1:-2])))
    return rows


def dead_port() -> int:
    with socket.socket() as probe:  # bound, never listening, then closed: nothing answers there
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.redis
def test_demo_with_redis(shared_redis_url: str) -> None:
    out = demo_output(shared_redis_url)
    assert f"-> Redis at {shared_redis_url} (L2)" in out
    assert served_from(out) == EXPECTED


def test_demo_without_redis_uses_fakeredis_with_lua() -> None:
    """No Redis answers: the embedded fakeredis must run Lua (leases, fenced writes), else the
    second process's read would fall through to the loader instead of being an L2 hit."""
    out = demo_output(f"redis://127.0.0.1:{dead_port()}/0")
    assert "an embedded fakeredis" in out
    assert served_from(out) == EXPECTED


def test_demo_without_lua_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "lupa.py").write_text("raise ImportError('lupa hidden by the test')\n")
    done = run_demo(f"redis://127.0.0.1:{dead_port()}/0", PYTHONPATH=str(tmp_path))
    assert done.returncode == 1
    assert "fakeredis has no Lua support: pip install 'tiercache-py[demo]'" in done.stderr
