"""docs/http-caching.md runs: its Python blocks execute in order as one program, against real
Redis, and the page's ``walkthrough`` is run against its app served by uvicorn."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.integration.http_harness import serve

pytestmark = pytest.mark.redis

PAGE = Path(__file__).resolve().parents[2] / "docs" / "http-caching.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_python_block_of_the_page_runs(shared_redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    namespace = "docs" + uuid.uuid4().hex[:10]
    monkeypatch.setenv("REDIS_URL", shared_redis_url)
    monkeypatch.setenv("CACHE_NAMESPACE", namespace)
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) == 3
    program: dict[str, Any] = {"__name__": "http_caching_docs"}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), program)
    try:
        with serve(program["app"]) as base:
            program["walkthrough"](base)
        with serve(program["starlette_app"]) as base:
            fr = httpx.get(base + "/greet", headers={"Accept-Language": "fr"}, timeout=10)
            en = httpx.get(base + "/greet", timeout=10)
            assert (fr.text, en.text) == ("bonjour", "hello")
            assert fr.headers["vary"] == "accept-language"
            assert "age" in httpx.get(base + "/greet", headers={"Accept-Language": "fr"}, timeout=10).headers
    finally:
        program["cache"].sync.close()
        client = redis.Redis.from_url(shared_redis_url)
        try:
            for key in client.scan_iter(match=f"*{namespace}*", count=1000):
                client.unlink(key)
        finally:
            client.close()
