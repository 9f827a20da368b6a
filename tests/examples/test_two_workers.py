"""The FastAPI and Flask examples as they are deployed: two worker processes (uvicorn, Flask's
server) on one Redis. A change made through one worker reaches the other's L1 over the
invalidation bus: the other worker serves the new value at once, not after the TTL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.redis_servers import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.redis


class Worker:
    def __init__(self, argv: list[str], port: int, env: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def wait_ready(self, path: str, deadline: float = 30.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                httpx.get(self.url + path, timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"worker at {self.url} did not answer within {deadline} s")

    def stop(self) -> None:
        self.proc.terminate()  # this worker's own PID
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def start_workers(
    shared_redis_url: str,
) -> Iterator[Callable[[Callable[[int], list[str]], str], list[Worker]]]:
    namespace = "w" + uuid.uuid4().hex[:10]
    workers: list[Worker] = []

    def start(argv_for: Callable[[int], list[str]], ready_path: str) -> list[Worker]:
        env = {**os.environ, "REDIS_URL": shared_redis_url, "CACHE_NAMESPACE": namespace}
        pair = [Worker(argv_for(port), port, env) for port in (free_port(), free_port())]
        workers.extend(pair)
        for w in pair:
            w.wait_ready(ready_path)
        return pair

    yield start
    for w in workers:
        w.stop()
    client = redis.Redis.from_url(shared_redis_url)
    for key in client.scan_iter(match=f"*{namespace}*", count=1000):
        client.unlink(key)
    client.close()


def eventually(check: Callable[[], bool], within: float = 3.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_fastapi_price_change_crosses_to_the_other_uvicorn_worker(
    start_workers: Callable[..., list[Worker]],
) -> None:
    a, b = start_workers(
        lambda port: [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port)],
        "/metrics",
    )
    # Warm-up: B subscribes to the bus on its first cache miss, and clears its L1 once subscribed
    # (messages may have been missed before). Wait until a change from A reaches B at all.
    httpx.get(b.url + "/products/2")
    httpx.put(a.url + "/products/2/price", params={"price": "30.00"})
    assert eventually(lambda: httpx.get(b.url + "/products/2").json()["price"] == "30.00", within=10)

    assert httpx.get(a.url + "/products/1").json()["price"] == "24.90"
    assert httpx.get(b.url + "/products/1").json()["price"] == "24.90"  # from Redis
    assert httpx.get(b.url + "/debug/products/1").json()["source"] == "L1"  # B holds it in L1 now

    assert httpx.put(a.url + "/products/1/price", params={"price": "19.90"}).json()["price"] == "19.90"
    # B's L1 copy was dropped by the bus: its next read goes to Redis, where A wrote the new price
    # (without the bus, B served 24.90 from L1 for the whole 30 s TTL)
    assert eventually(lambda: httpx.get(b.url + "/products/1").json()["price"] == "19.90")


def test_flask_flag_change_crosses_to_the_other_worker(start_workers: Callable[..., list[Worker]]) -> None:
    a, b = start_workers(
        lambda port: [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "examples.flask_app",
            "run",
            "--port",
            str(port),
        ],
        "/flags/x",
    )
    httpx.get(b.url + "/flags/warm-up")  # B subscribes (see above), then its L1 is stable
    httpx.put(a.url + "/flags/warm-up", params={"enabled": "true"})
    assert eventually(lambda: httpx.get(b.url + "/flags/warm-up").json()["enabled"] is True, within=10)

    assert httpx.get(b.url + "/flags/beta-search").json() == {"enabled": True, "source": "LOADED"}
    assert httpx.get(b.url + "/flags/beta-search").json() == {"enabled": True, "source": "L1"}
    assert httpx.put(a.url + "/flags/beta-search", params={"enabled": "false"}).json() == {"enabled": False}
    assert eventually(lambda: httpx.get(b.url + "/flags/beta-search").json()["enabled"] is False)
    assert httpx.get(b.url + "/flags/beta-search").json() == {"enabled": False, "source": "L1"}
