"""A real browser (headless Chromium) revalidates a cached response with If-None-Match and gets 304.

The page fetches ``/data`` twice. ``/data`` is cached by the server for 60 s (``s-maxage``) but is
stale for browsers at once (``max-age=0``), so Chromium's HTTP cache must revalidate the second
fetch: the server records that request's ``If-None-Match`` and the 304 it answered, and the page
shows that the browser still handed the script the full body (from its own cache).

Chromium comes from Debian's ``chromium`` package (``.ci/run`` installs it). Where it cannot be
installed the test is skipped loudly (a warning and a skip reason in the summary); under CI
(``CI=true`` or ``TIERCACHE_REQUIRE_BROWSER=1``) a missing browser is a failure instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.integration.http_harness import serve
from tests.redis_servers import purge_prefix
from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier
from tiercache.contrib.starlette import HttpCache

pytestmark = pytest.mark.redis

fastapi = pytest.importorskip("fastapi")

PAGE = """<!doctype html><html><head><title>revalidation</title></head><body>
<pre id="out">pending</pre>
<script>
(async () => {
  const seen = [];
  for (let i = 0; i < 2; i++) {
    const r = await fetch('/data');
    seen.push(r.status + ' ' + (await r.text()));
  }
  document.getElementById('out').textContent = 'done|' + seen.join('|');
})().catch(e => { document.getElementById('out').textContent = 'error|' + e; });
</script></body></html>"""


def find_chromium() -> str | None:
    explicit = os.environ.get("TIERCACHE_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    path = find_chromium()
    if path is not None:
        return path
    message = (
        "headless Chromium is not installed, so the browser revalidation test (If-None-Match -> 304) "
        "did NOT run; install Debian's 'chromium' package (.ci/run does) or set TIERCACHE_CHROMIUM"
    )
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if in_ci or os.environ.get("TIERCACHE_REQUIRE_BROWSER"):
        pytest.fail(message)
    print(f"\nWARNING: {message}", file=sys.stderr)
    warnings.warn(message, pytest.PytestWarning, stacklevel=1)
    pytest.skip(message)


def test_chromium_revalidates_with_if_none_match_and_gets_304(
    shared_redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    chromium = require_chromium()
    cache = TieredCache(
        [MemoryTier(), RedisTier(url=shared_redis_url, prefix=redis_prefix)],
        namespace="browser" + uuid.uuid4().hex[:8],
    )
    http_cache = HttpCache(cache)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await cache.aclose()

    app = fastapi.FastAPI(lifespan=lifespan)
    http_cache.install(app)
    calls: list[int] = []
    exchanges: list[tuple[str, str | None, int, str | None]] = []  # path, If-None-Match, status, ETag

    @app.get("/page", response_class=fastapi.responses.HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/data")
    @http_cache.cached(max_age=0, s_maxage=60)
    async def data() -> dict[str, Any]:
        calls.append(1)
        return {"answer": 42}

    def record(asgi: Any) -> Any:
        async def recorder(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await asgi(scope, receive, send)
                return
            headers = dict(scope["headers"])
            inm = headers.get(b"if-none-match")

            async def watch(message: Any) -> None:
                if message["type"] == "http.response.start":
                    etag = dict(message.get("headers", [])).get(b"etag")
                    exchanges.append(
                        (
                            scope["path"],
                            None if inm is None else inm.decode(),
                            message["status"],
                            None if etag is None else etag.decode(),
                        )
                    )
                await send(message)

            await asgi(scope, receive, watch)

        return recorder

    try:
        with serve(record(app)) as base:
            result = subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",  # CI containers run as root
                    "--disable-gpu",
                    "--no-first-run",
                    "--no-default-browser-check",
                    f"--user-data-dir={tmp_path / 'profile'}",
                    "--virtual-time-budget=15000",  # run the page's script until its fetches are done
                    "--dump-dom",
                    base + "/page",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
    finally:
        purge_prefix(shared_redis_url, redis_prefix)

    assert result.returncode == 0, result.stderr[-2000:]
    assert 'done|200 {"answer":42}|200 {"answer":42}' in result.stdout, result.stdout[-2000:]
    fetched = [(inm, status, etag) for path, inm, status, etag in exchanges if path == "/data"]
    assert len(fetched) == 2, exchanges
    (first_inm, first_status, etag), (second_inm, second_status, second_etag) = fetched
    assert (first_inm, first_status) == (None, 200)
    assert etag is not None and etag.startswith('"')
    assert second_inm == etag, "the browser revalidated with the ETag it was given"
    assert second_status == 304
    assert second_etag == etag
    assert calls == [1], "the 304 came from the server's cache, not from the handler"
