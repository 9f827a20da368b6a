"""tiercache.contrib.starlette through real HTTP: uvicorn on loopback, FastAPI/Starlette, real Redis.

Each test counts how often the handler really ran, so "served from the cache" is observed, not
assumed; lifetimes move with an injected clock instead of sleeps.
"""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis

from tests.integration.http_harness import serve
from tests.redis_servers import purge_prefix
from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier
from tiercache.contrib.starlette import HttpCache, if_none_match_matches, parse_cache_control, strong_etag
from tiercache.testing import FakeClock

pytestmark = pytest.mark.redis

fastapi = pytest.importorskip("fastapi")


class Env:
    """One test's cache (memory -> real Redis), clock and handler call counter."""

    def __init__(self, url: str, prefix: str, *, real_clock: bool = False) -> None:
        self.url = url
        self.prefix = prefix
        self.clock = FakeClock()
        self.namespace = "http" + uuid.uuid4().hex[:10]
        self.cache = TieredCache(
            [MemoryTier(), RedisTier(url=url, prefix=prefix)],
            namespace=self.namespace,
            clock=None if real_clock else self.clock,
            fail_safe_throttle=0.0,
        )
        self.http = HttpCache(self.cache)
        self.calls: dict[str, int] = {}

    def hit(self, name: str) -> int:
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.calls[name]

    def app(self, **kwargs: Any) -> Any:
        cache = self.cache

        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            yield
            await cache.aclose()

        app = fastapi.FastAPI(lifespan=lifespan, **kwargs)
        self.http.install(app)
        return app

    def redis_keys(self) -> list[bytes]:
        client = redis.Redis.from_url(self.url)
        try:
            return list(client.scan_iter(match=f"{self.prefix}:*"))
        finally:
            client.close()


@pytest.fixture
def env(shared_redis_url: str, redis_prefix: str) -> Iterator[Env]:
    e = Env(shared_redis_url, redis_prefix)
    yield e
    purge_prefix(shared_redis_url, redis_prefix)


def get(base: str, path: str, **headers: str) -> httpx.Response:
    return httpx.get(base + path, headers=headers, timeout=10)


# --- Cache-Control, stored and served -----------------------------------------------------------


def test_max_age_and_s_maxage_store_in_redis_and_serve_hits_with_age(env: Env) -> None:
    app = env.app()

    @app.get("/items/{item_id}")
    @env.http.cached(max_age=30, s_maxage=120)
    async def read_item(item_id: int, q: str = "none") -> dict[str, Any]:
        return {"id": item_id, "q": q, "n": env.hit("item")}

    with serve(app) as base:
        first = get(base, "/items/7?q=x")
        assert first.status_code == 200
        assert first.json() == {"id": 7, "q": "x", "n": 1}
        assert first.headers["cache-control"] == "max-age=30, s-maxage=120"
        assert first.headers["etag"] == strong_etag(first.content)
        assert "age" not in first.headers  # produced for this request
        assert env.redis_keys(), "the response is stored in Redis"

        env.clock.advance(50)  # past max-age (browsers) but inside s-maxage (the shared cache)
        second = get(base, "/items/7?q=x")
        assert second.json() == {"id": 7, "q": "x", "n": 1}
        assert second.headers["age"] == "50"
        assert second.headers["etag"] == first.headers["etag"]

        assert get(base, "/items/7?q=y").json()["n"] == 2  # another query string: another entry
        env.clock.advance(71)  # s-maxage over
        assert get(base, "/items/7?q=x").json()["n"] == 3
    assert env.calls["item"] == 3


def test_a_second_process_reads_the_response_from_redis(env: Env) -> None:
    app = env.app()

    @app.get("/shared")
    @env.http.cached(max_age=60)
    async def shared() -> dict[str, int]:
        return {"n": env.hit("shared")}

    other = TieredCache(
        [MemoryTier(), RedisTier(url=env.url, prefix=env.prefix)], namespace=env.namespace, clock=env.clock
    )
    other_http = HttpCache(other)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await other.aclose()

    app2 = fastapi.FastAPI(lifespan=lifespan)
    other_http.install(app2)

    @app2.get("/shared")
    @other_http.cached(max_age=60)
    async def shared2() -> dict[str, int]:
        return {"n": 1000 + env.hit("shared")}

    with serve(app) as base, serve(app2) as base2:
        assert get(base, "/shared").json() == {"n": 1}
        again = get(base2, "/shared")  # its own L1 is empty: the Redis copy answers
        assert again.json() == {"n": 1}
        assert "age" in again.headers
    assert env.calls["shared"] == 1


def test_handler_no_store_or_private_is_passed_through_and_never_stored(env: Env) -> None:
    app = env.app()

    @app.get("/nostore")
    @env.http.cached(max_age=60)
    async def nostore(response: fastapi.Response) -> dict[str, int]:
        response.headers["Cache-Control"] = "no-store"
        return {"n": env.hit("nostore")}

    @app.get("/private")
    @env.http.cached(max_age=60)
    async def private(response: fastapi.Response) -> dict[str, int]:
        response.headers["Cache-Control"] = "private, max-age=60"
        return {"n": env.hit("private")}

    @app.get("/rule-private")
    @env.http.cached(max_age=60, private=True)
    async def rule_private() -> dict[str, str]:
        env.hit("rule-private")
        return {"user": "alice"}

    with serve(app) as base:
        for expected in (1, 2):
            r = get(base, "/nostore")
            assert r.json() == {"n": expected}
            assert r.headers["cache-control"] == "no-store"
            assert get(base, "/private").json() == {"n": expected}
        first = get(base, "/rule-private")
        assert first.headers["cache-control"] == "private, max-age=60"
        # never stored server-side, but the browser may keep it and revalidate: 304 still works
        again = get(base, "/rule-private", **{"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304
    assert env.calls == {"nostore": 2, "private": 2, "rule-private": 2}


def test_set_cookie_responses_and_authorized_requests_are_not_shared(env: Env) -> None:
    app = env.app()

    @app.get("/cookie")
    @env.http.cached(max_age=60)
    async def cookie(response: fastapi.Response) -> dict[str, int]:
        response.set_cookie("session", "secret")
        return {"n": env.hit("cookie")}

    @app.get("/me")
    @env.http.cached(max_age=60)
    async def me(request: fastapi.Request) -> dict[str, Any]:
        return {"auth": request.headers.get("authorization"), "n": env.hit("me")}

    @app.get("/public")
    @env.http.cached(max_age=60, public=True)
    async def public() -> dict[str, int]:
        return {"n": env.hit("public")}

    with serve(app) as base:
        assert get(base, "/cookie").json() == {"n": 1}
        assert get(base, "/cookie").json() == {"n": 2}
        assert get(base, "/me", Authorization="Bearer a").json()["auth"] == "Bearer a"
        assert get(base, "/me", Authorization="Bearer b").json()["auth"] == "Bearer b"
        assert get(base, "/public", Authorization="Bearer a").json() == {"n": 1}
        public_again = get(base, "/public", Authorization="Bearer b")
        assert public_again.json() == {"n": 1}
        assert public_again.headers["cache-control"] == "public, max-age=60"
    assert env.calls == {"cookie": 2, "me": 2, "public": 1}


# --- ETag and If-None-Match ---------------------------------------------------------------------


def test_etag_if_none_match_gives_304_with_weak_comparison(env: Env) -> None:
    app = env.app()

    @app.get("/doc")
    @env.http.cached(max_age=60, vary=("Accept-Language",))
    async def doc() -> dict[str, str]:
        env.hit("doc")
        return {"text": "hello"}

    with serve(app) as base:
        first = get(base, "/doc")
        etag = first.headers["etag"]
        assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
        for inm in (etag, "W/" + etag, f'"nope", {etag}', "*"):
            r = get(base, "/doc", **{"If-None-Match": inm})
            assert r.status_code == 304, inm
            assert r.content == b""
            assert r.headers["etag"] == etag
            assert r.headers["cache-control"] == "max-age=60"
            assert r.headers["vary"] == "accept-language"
            assert "content-type" not in r.headers
        miss = get(base, "/doc", **{"If-None-Match": '"other"'})
        assert miss.status_code == 200 and miss.json() == {"text": "hello"}
        head = httpx.head(base + "/doc", timeout=10)  # FastAPI routes GET only: the framework's 405
        assert head.status_code == 405
    assert env.calls["doc"] == 1


def test_a_handler_etag_is_kept_and_the_handler_never_sees_conditional_headers(env: Env) -> None:
    app = env.app()
    seen: list[str | None] = []

    @app.get("/tagged")
    @env.http.cached(max_age=60)
    async def tagged(request: fastapi.Request) -> fastapi.Response:
        seen.append(request.headers.get("if-none-match"))
        return fastapi.Response(b"v1", headers={"ETag": 'W/"v1"'}, media_type="text/plain")

    with serve(app) as base:
        r = get(base, "/tagged", **{"If-None-Match": '"v1"'})  # weak comparison: matches W/"v1"
        assert r.status_code == 304
        assert r.headers["etag"] == 'W/"v1"'
    assert seen == [None]


def test_pure_matching_helpers() -> None:
    assert if_none_match_matches('W/"a", "b"', '"a"')
    assert if_none_match_matches('"a"', 'W/"a"')
    assert not if_none_match_matches('"a,b"', '"a"')
    assert if_none_match_matches('"x", "a,b"', '"a,b"')
    assert parse_cache_control('max-age=5, No-Cache, private="set-cookie", max-age=9') == {
        "max-age": "5",
        "no-cache": None,
        "private": "set-cookie",
    }


# --- Vary ----------------------------------------------------------------------------------------


def test_vary_declared_by_the_rule_and_learnt_from_the_handler(env: Env) -> None:
    app = env.app()

    @app.get("/greeting")
    @env.http.cached(max_age=60, vary=("Accept-Language",))
    async def greeting(request: fastapi.Request) -> dict[str, Any]:
        lang = request.headers.get("accept-language", "en")
        return {"hello": {"fr": "bonjour", "en": "hello"}[lang], "n": env.hit("greeting")}

    @app.get("/tenant")
    @env.http.cached(max_age=60)
    async def tenant(request: fastapi.Request, response: fastapi.Response) -> dict[str, Any]:
        response.headers["Vary"] = "X-Tenant"
        return {"tenant": request.headers.get("x-tenant"), "n": env.hit("tenant")}

    with serve(app) as base:
        fr = get(base, "/greeting", **{"Accept-Language": "fr"})
        assert fr.json() == {"hello": "bonjour", "n": 1}
        assert fr.headers["vary"] == "accept-language"
        assert get(base, "/greeting", **{"Accept-Language": "en"}).json() == {"hello": "hello", "n": 2}
        assert get(base, "/greeting", **{"Accept-Language": "fr"}).json() == {"hello": "bonjour", "n": 1}
        assert get(base, "/greeting").json()["n"] == 3  # header absent: its own variant

        assert get(base, "/tenant", **{"X-Tenant": "a"}).json() == {"tenant": "a", "n": 1}
        assert get(base, "/tenant", **{"X-Tenant": "b"}).json() == {"tenant": "b", "n": 2}
        assert get(base, "/tenant", **{"X-Tenant": "a"}).json() == {"tenant": "a", "n": 1}
        assert get(base, "/tenant", **{"X-Tenant": "b"}).json() == {"tenant": "b", "n": 2}


# --- request directives ---------------------------------------------------------------------------


def test_request_no_cache_pragma_and_max_age_revalidate_with_the_handler(env: Env) -> None:
    app = env.app()

    @app.get("/counter")
    @env.http.cached(max_age=60)
    async def counter() -> dict[str, int]:
        return {"n": env.hit("counter")}

    with serve(app) as base:
        assert get(base, "/counter").json() == {"n": 1}
        assert get(base, "/counter").json() == {"n": 1}
        assert get(base, "/counter", **{"Cache-Control": "no-cache"}).json() == {"n": 2}
        assert get(base, "/counter").json() == {"n": 2}  # the revalidated copy was stored
        assert get(base, "/counter", Pragma="no-cache").json() == {"n": 3}
        assert get(base, "/counter", **{"Cache-Control": "max-age=0"}).json() == {"n": 4}
        env.clock.advance(10)
        assert get(base, "/counter", **{"Cache-Control": "max-age=20"}).json() == {"n": 4}
        assert get(base, "/counter", **{"Cache-Control": "max-age=5"}).json() == {"n": 5}
        # a revalidation whose body did not change still answers the client's validator with 304
        etag = get(base, "/counter").headers["etag"]
        env.calls["counter"] -= 1  # the handler will produce the same body again
        r = get(base, "/counter", **{"Cache-Control": "no-cache", "If-None-Match": etag})
        assert r.status_code == 304


def test_request_directives_can_be_ignored(env: Env) -> None:
    app = env.app()

    @app.get("/firm")
    @env.http.cached(max_age=60, request_directives=False)
    async def firm() -> dict[str, int]:
        return {"n": env.hit("firm")}

    with serve(app) as base:
        assert get(base, "/firm").json() == {"n": 1}
        for headers in ({"Cache-Control": "no-cache"}, {"Pragma": "no-cache"}, {"Cache-Control": "no-store"}):
            assert get(base, "/firm", **headers).json() == {"n": 1}
    assert env.calls["firm"] == 1


def test_request_no_store_is_never_stored_and_only_if_cached(env: Env) -> None:
    app = env.app()

    @app.get("/ns")
    @env.http.cached(max_age=60)
    async def ns() -> dict[str, int]:
        return {"n": env.hit("ns")}

    with serve(app) as base:
        assert get(base, "/ns", **{"Cache-Control": "only-if-cached"}).status_code == 504
        assert get(base, "/ns", **{"Cache-Control": "no-store"}).json() == {"n": 1}
        assert get(base, "/ns", **{"Cache-Control": "no-store"}).json() == {"n": 2}
        assert env.redis_keys() == []  # nothing of it reached Redis
        assert get(base, "/ns").json() == {"n": 3}
        # a fresh stored response may still answer a no-store request (RFC 9111 5.2.1.5)
        assert get(base, "/ns", **{"Cache-Control": "no-store"}).json() == {"n": 3}
        assert get(base, "/ns", **{"Cache-Control": "only-if-cached"}).json() == {"n": 3}


# --- RFC 5861 --------------------------------------------------------------------------------------


def test_stale_while_revalidate_serves_stale_once_then_the_refreshed_copy(env: Env) -> None:
    app = env.app()

    @app.get("/swr")
    @env.http.cached(max_age=10, stale_while_revalidate=30)
    async def swr() -> dict[str, int]:
        return {"n": env.hit("swr")}

    with serve(app) as base:
        first = get(base, "/swr")
        assert first.headers["cache-control"] == "max-age=10, stale-while-revalidate=30"
        env.clock.advance(15)
        stale = get(base, "/swr")
        assert stale.json() == {"n": 1}  # answered at once with the stale copy
        assert stale.headers["age"] == "15"
        deadline = time.monotonic() + 10
        while (fresh := get(base, "/swr")).json() != {"n": 2} and time.monotonic() < deadline:
            time.sleep(0.01)  # the background refresh lands
        assert fresh.json() == {"n": 2}
        assert env.calls["swr"] == 2  # one refresh, however many requests saw the stale copy
        env.clock.advance(10 + 31)  # past fresh + SWR: a plain miss, loaded while the client waits
        assert get(base, "/swr").json() == {"n": 3}


def test_swr_window_shorter_than_sie_window_is_not_stretched(env: Env) -> None:
    app = env.app()

    @app.get("/win")
    @env.http.cached(max_age=10, stale_while_revalidate=5, stale_if_error=100)
    async def win() -> dict[str, int]:
        return {"n": env.hit("win")}

    with serve(app) as base:
        assert get(base, "/win").json() == {"n": 1}
        env.clock.advance(30)  # stale, past SWR's 5 s but inside stale-if-error's 100 s
        assert get(base, "/win").json() == {"n": 2}  # revalidated before answering


def test_stale_if_error_serves_stale_on_exception_or_5xx_within_its_window(env: Env) -> None:
    app = env.app()
    mode = {"fail": ""}

    @app.get("/sie")
    @env.http.cached(max_age=10, stale_if_error=60)
    async def sie() -> Any:
        n = env.hit("sie")
        if mode["fail"] == "raise":
            raise RuntimeError("database down")
        if mode["fail"] == "503":
            return fastapi.responses.JSONResponse({"error": "busy"}, status_code=503)
        return {"n": n}

    with serve(app) as base:
        assert get(base, "/sie").json() == {"n": 1}
        env.clock.advance(20)
        mode["fail"] = "raise"
        r = get(base, "/sie")
        assert (r.status_code, r.json()) == (200, {"n": 1})
        mode["fail"] = "503"
        r = get(base, "/sie")
        assert (r.status_code, r.json()) == (200, {"n": 1})
        env.clock.advance(60)  # past the stale-if-error window: the error stands
        r = get(base, "/sie")
        assert r.status_code == 503 and r.json() == {"error": "busy"}
        mode["fail"] = "raise"
        assert get(base, "/sie").status_code == 500


def test_without_stale_if_error_an_error_is_not_hidden(env: Env) -> None:
    app = env.app()
    mode = {"fail": False}

    @app.get("/plain")
    @env.http.cached(max_age=10)
    async def plain() -> Any:
        if mode["fail"]:
            return fastapi.responses.JSONResponse({"error": "busy"}, status_code=503)
        return {"n": env.hit("plain")}

    with serve(app) as base:
        assert get(base, "/plain").json() == {"n": 1}
        env.clock.advance(11)
        mode["fail"] = True
        assert get(base, "/plain").status_code == 503


# --- declarative invalidation --------------------------------------------------------------------


def test_evict_by_path_and_tag_before_the_write_response_completes(env: Env) -> None:
    app = env.app()
    db = {"1": "one", "2": "two"}

    @app.get("/things/{tid}")
    @env.http.cached(max_age=300, vary=("Accept",), tags=("things", "thing:{tid}"))
    async def read(tid: str) -> dict[str, str]:
        env.hit("read")
        return {"id": tid, "name": db[tid]}

    @app.post("/things/{tid}")
    @env.http.evict(paths=("/things/{tid}",))
    async def update(tid: str, name: str) -> dict[str, str]:
        db[tid] = name
        return {"ok": tid}

    @app.post("/rename-all")
    @env.http.evict(tags=("things",))
    async def rename_all() -> dict[str, bool]:
        for k in db:
            db[k] = db[k].upper()
        return {"ok": True}

    @app.post("/fail/{tid}")
    @env.http.evict(paths=("/things/{tid}",))
    async def fail(tid: str) -> Any:
        db[tid] = "not committed"
        return fastapi.responses.JSONResponse({"error": "x"}, status_code=409)

    with serve(app) as base:
        assert get(base, "/things/1").json()["name"] == "one"
        assert get(base, "/things/1", Accept="application/json").json()["name"] == "one"
        assert get(base, "/things/2").json()["name"] == "two"
        assert env.calls["read"] == 3
        assert httpx.post(base + "/things/1?name=uno", timeout=10).status_code == 200
        assert get(base, "/things/1").json()["name"] == "uno"  # every variant of the path dropped
        assert get(base, "/things/1", Accept="application/json").json()["name"] == "uno"
        assert get(base, "/things/2").json()["name"] == "two"  # other paths untouched
        assert env.calls["read"] == 5
        assert httpx.post(base + "/fail/2", timeout=10).status_code == 409
        assert get(base, "/things/2").json()["name"] == "two"  # a failed write evicts nothing
        httpx.post(base + "/rename-all", timeout=10)
        assert get(base, "/things/2").json()["name"] == "NOT COMMITTED"


def test_put_stores_the_new_representation_before_the_write_completes(
    shared_redis_url: str, redis_prefix: str
) -> None:
    # the real clock: the put must be newer than the path invalidation written just before it
    env = Env(shared_redis_url, redis_prefix, real_clock=True)
    app = env.app()
    db = {"name": "old"}

    @app.get("/profile/{pid}")
    @env.http.cached(max_age=300)
    async def read(pid: int) -> dict[str, Any]:
        env.hit("read")
        return {"id": pid, "name": db["name"]}

    @app.put("/profile/{pid}")
    @env.http.put("/profile/{pid}")
    async def write(pid: int, name: str) -> dict[str, Any]:
        db["name"] = name
        return {"id": pid, "name": name}

    try:
        with serve(app) as base:
            assert get(base, "/profile/3").json() == {"id": 3, "name": "old"}
            put = httpx.put(base + "/profile/3?name=new", timeout=10)
            assert put.json() == {"id": 3, "name": "new"}
            after = get(base, "/profile/3")
            assert after.json() == {"id": 3, "name": "new"}
            assert after.headers["cache-control"] == "max-age=300"
            assert "age" in after.headers  # from the cache, not from the handler
        assert env.calls["read"] == 2  # the first GET, then the one run by the put
    finally:
        purge_prefix(shared_redis_url, redis_prefix)


# --- frameworks and signatures -------------------------------------------------------------------


def test_fastapi_still_sees_the_parameters_and_dependencies(env: Env) -> None:
    app = env.app()

    def page_size(size: int = 10) -> int:
        return size

    async def search(term: str, page: int = 1, size: int = fastapi.Depends(page_size)) -> dict[str, Any]:
        env.hit("search")
        return {"term": term, "page": page, "size": size}

    before = inspect.signature(search, eval_str=True)  # the same, with the annotations resolved
    decorated = env.http.cached(max_age=60)(search)
    assert inspect.signature(decorated) == before
    assert decorated.__wrapped__ is search  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(decorated)
    app.get("/search")(decorated)

    @app.get("/sync/{item}")
    @env.http.cached(max_age=60)
    def sync_item(item: str, flag: bool = False) -> dict[str, Any]:
        import threading

        env.hit("sync")
        return {"item": item, "flag": flag, "thread": threading.current_thread().name}

    assert not inspect.iscoroutinefunction(sync_item)
    assert list(inspect.signature(sync_item).parameters) == ["item", "flag"]

    with serve(app) as base:
        first = get(base, "/sync/a?flag=true").json()
        assert first["item"] == "a" and first["flag"] is True
        assert first["thread"] != "uvicorn-test"  # not the event loop: FastAPI still uses its thread pool
        assert get(base, "/sync/a?flag=true").json() == first
        assert env.calls["sync"] == 1
        assert get(base, "/search?term=a&page=2&size=5").json() == {"term": "a", "page": 2, "size": 5}
        assert get(base, "/search?term=a&page=2&size=5").json() == {"term": "a", "page": 2, "size": 5}
        assert get(base, "/search").status_code == 422  # validation still runs (not stored)
        assert get(base, "/search").status_code == 422
        schema = httpx.get(base + "/openapi.json", timeout=10).json()
        names = {p["name"] for p in schema["paths"]["/search"]["get"]["parameters"]}
        assert names == {"term", "page", "size"}
    assert env.calls["search"] == 1


def test_plain_starlette_app_with_head_and_a_sync_endpoint(env: Env) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    @env.http.cached(max_age=60)
    def hello(request: Request) -> PlainTextResponse:
        n = env.hit("hello")
        return PlainTextResponse(f"hello {request.path_params['name']} #{n}")

    cache = env.cache

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await cache.aclose()

    app = Starlette(routes=[Mount("/api", routes=[Route("/hello/{name}", hello)])], lifespan=lifespan)
    env.http.install(app)

    with serve(app) as base:
        first = get(base, "/api/hello/bob")
        assert first.text == "hello bob #1"
        assert first.headers["content-type"].startswith("text/plain")
        head = httpx.head(base + "/api/hello/bob", timeout=10)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(b"hello bob #1"))
        assert head.headers["etag"] == first.headers["etag"]
        assert get(base, "/api/hello/bob", **{"If-None-Match": first.headers["etag"]}).status_code == 304
        assert get(base, "/api/hello/eve").text == "hello eve #2"
    assert env.calls["hello"] == 2


def test_a_broken_redis_never_breaks_a_request(shared_redis_url: str) -> None:
    from tests.integration.http_harness import free_port

    cache = TieredCache(
        [MemoryTier(), RedisTier(url=f"redis://127.0.0.1:{free_port()}/0")],
        namespace="down" + uuid.uuid4().hex[:6],
    )
    http = HttpCache(cache)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await cache.aclose()

    app = fastapi.FastAPI(lifespan=lifespan)
    http.install(app)
    calls = []

    @app.get("/x")
    @http.cached(max_age=60)
    async def x() -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    with serve(app) as base:
        assert get(base, "/x").json() == {"n": 1}
        assert get(base, "/x").json() == {"n": 1}  # L1 still serves


def test_bad_rules_are_refused_when_declared(env: Env) -> None:
    from tiercache import ConfigurationError

    with pytest.raises(ConfigurationError):
        env.http.cached(max_age=-1)
    with pytest.raises(ConfigurationError):
        env.http.cached(max_age=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        env.http.cached(max_age=1, private=True, public=True)
    with pytest.raises(ConfigurationError):
        env.http.cached(max_age=1, vary="Accept")
    with pytest.raises(ConfigurationError):
        env.http.cached(max_age=1, statuses=(200, "304"))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        env.http.cached(max_age=1, max_body=-1)
    with pytest.raises(ConfigurationError):
        env.http.evict()
    with pytest.raises(ConfigurationError):
        env.http.evict(paths=("/x/{a.b}",))
    with pytest.raises(ConfigurationError):
        HttpCache(object())  # type: ignore[arg-type]


# --- concurrency ---------------------------------------------------------------------------------


def gather_gets(base: str, path: str, headers: list[dict[str, str]]) -> list[httpx.Response]:
    import asyncio

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(headers))
        async with httpx.AsyncClient(base_url=base, timeout=20, limits=limits) as client:
            return list(await asyncio.gather(*(client.get(path, headers=h) for h in headers)))

    return asyncio.run(run())


def test_concurrent_cold_requests_run_the_handler_once(env: Env) -> None:
    import asyncio

    app = env.app()

    @app.get("/slow")
    @env.http.cached(max_age=60)
    async def slow() -> dict[str, int]:
        n = env.hit("slow")
        await asyncio.sleep(0.3)
        return {"n": n}

    with serve(app) as base:
        responses = gather_gets(base, "/slow", [{}] * 40)
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["n"] for r in responses} == {1}
    assert env.calls["slow"] == 1


def test_concurrent_requests_never_get_each_others_unshareable_answer(env: Env) -> None:
    import asyncio

    app = env.app()

    @app.get("/whoami")
    @env.http.cached(max_age=60)
    async def whoami(request: fastapi.Request, response: fastapi.Response) -> dict[str, Any]:
        response.headers["Cache-Control"] = "private, max-age=60"  # decided by the handler
        env.hit("whoami")
        await asyncio.sleep(0.1)
        return {"user": request.headers["x-user"]}

    with serve(app) as base:
        users = [{"X-User": f"u{i}"} for i in range(30)]
        for _ in range(2):  # cold (one shared load, then each runs alone), then with the pass marker
            responses = gather_gets(base, "/whoami", users)
            assert [r.json()["user"] for r in responses] == [h["X-User"] for h in users]
            assert {r.headers["cache-control"] for r in responses} == {"private, max-age=60"}
    assert env.calls["whoami"] == 60


def test_an_answer_that_becomes_unshareable_replaces_the_stored_one_and_back(env: Env) -> None:
    app = env.app()
    mode = {"cc": ""}

    @app.get("/flip")
    @env.http.cached(max_age=10)
    async def flip(response: fastapi.Response) -> dict[str, int]:
        if mode["cc"]:
            response.headers["Cache-Control"] = mode["cc"]
        return {"n": env.hit("flip")}

    with serve(app) as base:
        assert get(base, "/flip").json() == {"n": 1}
        assert get(base, "/flip").json() == {"n": 1}
        env.clock.advance(11)
        mode["cc"] = "no-store"
        assert get(base, "/flip").json() == {"n": 2}
        assert get(base, "/flip").json() == {"n": 3}  # the old copy is gone, nothing new stored
        mode["cc"] = ""
        assert get(base, "/flip").json() == {"n": 4}  # shareable again: stored
        assert get(base, "/flip").json() == {"n": 4}
        mode["cc"] = "no-store"
        assert get(base, "/flip", **{"Cache-Control": "no-cache"}).json() == {"n": 5}
        assert get(base, "/flip").json() == {"n": 6}  # revalidation replaced the stored copy


def test_routes_of_routers_included_after_install_and_put_through_a_mount(
    shared_redis_url: str, redis_prefix: str
) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    env = Env(shared_redis_url, redis_prefix, real_clock=True)

    router = fastapi.APIRouter(prefix="/v1")

    @router.get("/ping")
    @env.http.cached(max_age=60)
    async def ping() -> dict[str, int]:
        return {"n": env.hit("ping")}

    app = env.app()
    app.include_router(router)
    state = {"v": "a"}

    @env.http.cached(max_age=60, tags=("conf",))
    async def read_conf(request: Request) -> JSONResponse:
        env.hit("conf")
        return JSONResponse({"name": request.path_params["name"], "v": state["v"]})

    @env.http.put("/sub/conf/{name}")
    async def write_conf(request: Request) -> JSONResponse:
        state["v"] = (await request.json())["v"]
        return JSONResponse({"saved": True}, status_code=201)

    sub = Starlette(
        routes=[
            Route("/conf/{name}", read_conf, methods=["GET"]),
            Route("/conf/{name}", write_conf, methods=["PUT"]),
        ]
    )
    app.mount("/sub", sub)

    try:
        run_included_and_mounted(env, app)
    finally:
        purge_prefix(shared_redis_url, redis_prefix)


def run_included_and_mounted(env: Env, app: Any) -> None:
    with serve(app) as base:
        assert get(base, "/v1/ping").json() == {"n": 1}
        assert get(base, "/v1/ping").json() == {"n": 1}
        assert get(base, "/sub/conf/db").json() == {"name": "db", "v": "a"}
        r = httpx.put(base + "/sub/conf/db", json={"v": "b"}, timeout=10)
        assert r.status_code == 201
        after = get(base, "/sub/conf/db")
        assert after.json() == {"name": "db", "v": "b"}
        assert "age" in after.headers
    assert env.calls == {"ping": 1, "conf": 2}


def test_a_vary_the_handler_declares_never_leaks_a_variant_while_it_is_learnt(env: Env) -> None:
    import asyncio

    app = env.app()

    @app.get("/dash")
    @env.http.cached(max_age=60)
    async def dash(request: fastapi.Request, response: fastapi.Response) -> dict[str, Any]:
        response.headers["Vary"] = "X-Tenant"  # not declared in the rule: learnt from here
        env.hit("dash")
        await asyncio.sleep(0.2)
        return {"tenant": request.headers["x-tenant"]}

    with serve(app) as base:
        tenants = [{"X-Tenant": f"t{i}"} for i in range(20)]
        responses = gather_gets(base, "/dash", tenants)
        assert [r.json()["tenant"] for r in responses] == [h["X-Tenant"] for h in tenants]
        again = gather_gets(base, "/dash", tenants)  # learnt: each tenant's variant is served
        assert [r.json()["tenant"] for r in again] == [h["X-Tenant"] for h in tenants]


def test_a_2xx_write_whose_response_breaks_midway_still_evicts(env: Env) -> None:
    app = env.app()
    db = {"v": "old"}

    @app.get("/val")
    @env.http.cached(max_age=300)
    async def val() -> dict[str, str]:
        return {"v": db["v"]}

    @app.post("/val")
    @env.http.evict(paths=("/val",))
    async def set_val() -> Any:
        db["v"] = "new"

        async def body() -> Any:
            yield b"partial"
            raise RuntimeError("the stream broke after the data changed")

        return fastapi.responses.StreamingResponse(body())

    with serve(app) as base:
        assert get(base, "/val").json() == {"v": "old"}
        with pytest.raises(httpx.HTTPError):
            httpx.post(base + "/val", timeout=10).read()
        assert get(base, "/val").json() == {"v": "new"}


def test_a_hit_is_answered_from_memory_without_a_redis_round_trip(redis_server: Any) -> None:
    from tests.redis_servers import commandstats

    env = Env(redis_server.url, "hits")
    app = env.app()

    @app.get("/hot/{n}")
    @env.http.cached(max_age=60, tags=("hot",))
    async def hot(n: int) -> dict[str, int]:
        return {"n": n, "runs": env.hit("hot")}

    @app.get("/mine")
    @env.http.cached(max_age=60)
    async def mine(response: fastapi.Response) -> dict[str, int]:
        response.headers["Cache-Control"] = "private, max-age=60"  # never shared
        return {"runs": env.hit("mine")}

    with serve(app) as base:
        assert get(base, "/hot/1").json() == {"n": 1, "runs": 1}
        assert get(base, "/hot/1").json() == {"n": 1, "runs": 1}  # learns the tags' times (1 HMGET)
        assert get(base, "/mine").json() == {"runs": 1}  # leaves a pass marker
        assert get(base, "/mine").json() == {"runs": 2}
        before = commandstats(redis_server.port)
        for _ in range(20):
            assert get(base, "/hot/1").json() == {"n": 1, "runs": 1}
        for i in range(5):  # the handler runs each time; the cache answers "pass" from memory
            assert get(base, "/mine").json() == {"runs": 3 + i}
        after = commandstats(redis_server.port)
    spent = {cmd: after.get(cmd, 0) - before.get(cmd, 0) for cmd in after}
    assert {cmd: n for cmd, n in spent.items() if n and cmd not in ("info",)} == {}


def test_statuses_and_body_size_decide_what_is_stored(env: Env) -> None:
    app = env.app()

    @app.get("/missing")
    @env.http.cached(max_age=60)
    async def missing() -> None:
        env.hit("missing")
        raise fastapi.HTTPException(status_code=404, detail="no such thing")

    @app.get("/moved")
    @env.http.cached(max_age=60)
    async def moved() -> Any:
        env.hit("moved")
        return fastapi.responses.RedirectResponse("/elsewhere", status_code=302)

    @app.get("/big")
    @env.http.cached(max_age=60, max_body=1000)
    async def big() -> fastapi.Response:
        env.hit("big")
        return fastapi.Response(b"x" * 5000, media_type="text/plain")

    with serve(app) as base:
        for _ in range(2):
            assert get(base, "/missing").status_code == 404  # heuristically cacheable: stored
            r = httpx.get(base + "/moved", timeout=10, follow_redirects=False)
            assert r.status_code == 302 and r.headers["location"] == "/elsewhere"  # not stored
            assert len(get(base, "/big").content) == 5000  # served whole, not stored
    assert env.calls == {"missing": 1, "moved": 2, "big": 2}


def test_evict_from_code(env: Env) -> None:
    import asyncio

    app = env.app()

    @app.get("/a/{x}")
    @env.http.cached(max_age=60, tags=("letters", "a:{x}"))
    async def a(x: str) -> dict[str, int]:
        return {"runs": env.hit("a")}

    @app.post("/admin/flush/{what}")
    async def flush(what: str) -> dict[str, bool]:
        if what == "path":
            await env.http.evict_paths("/a/1")
        else:
            await env.http.evict_tags("a:2")
        await asyncio.sleep(0)
        return {"ok": True}

    with serve(app) as base:
        assert get(base, "/a/1").json() == {"runs": 1}
        assert get(base, "/a/2").json() == {"runs": 2}
        httpx.post(base + "/admin/flush/path", timeout=10)
        env.clock.advance(0.01)  # a tag drops what was created at or before its invalidation
        assert get(base, "/a/1").json() == {"runs": 3}
        assert get(base, "/a/2").json() == {"runs": 2}
        httpx.post(base + "/admin/flush/tag", timeout=10)
        env.clock.advance(0.01)
        assert get(base, "/a/2").json() == {"runs": 4}
        assert get(base, "/a/1").json() == {"runs": 3}


def test_an_eviction_in_one_process_reaches_another_process_memory(env: Env) -> None:
    db = {"v": "old"}
    runs = {"a": 0, "b": 0}

    def make(http: HttpCache, cache: TieredCache, name: str) -> Any:
        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            yield
            await cache.aclose()

        app = fastapi.FastAPI(lifespan=lifespan)
        http.install(app)

        @app.get("/doc")
        @http.cached(max_age=300)
        async def doc() -> dict[str, str]:
            runs[name] += 1
            return {"v": db["v"]}

        @app.post("/doc")
        @http.evict(paths=("/doc",))
        async def write() -> dict[str, bool]:
            db["v"] = "new"
            return {"ok": True}

        return app

    other = TieredCache(  # a second process: its own memory tier, the same Redis and namespace
        [MemoryTier(), RedisTier(url=env.url, prefix=env.prefix)], namespace=env.namespace, clock=env.clock
    )
    with serve(make(env.http, env.cache, "a")) as a, serve(make(HttpCache(other), other, "b")) as b:
        assert get(a, "/doc").json() == {"v": "old"}
        assert get(b, "/doc").json() == {"v": "old"}  # from Redis, now in b's memory too
        assert get(b, "/doc").json() == {"v": "old"}
        assert httpx.post(a + "/doc", timeout=10).status_code == 200
        # without a bus, b re-reads the shared tag times after tag_refresh (1 s); with one
        # (TieredCache(bus=...)) it would drop its copy at once
        env.clock.advance(1.5)
        assert get(b, "/doc").json() == {"v": "new"}
    assert runs == {"a": 1, "b": 1}


def test_a_cold_url_runs_its_handler_once_across_two_processes(env: Env) -> None:
    """Two servers, each with its own cache and event loop (as two processes would have), share
    only Redis: the Redis lease lets one of them run the handler."""
    import asyncio

    def make(http: HttpCache, cache: TieredCache) -> Any:
        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            yield
            await cache.aclose()

        app = fastapi.FastAPI(lifespan=lifespan)
        http.install(app)

        @app.get("/report")
        @http.cached(max_age=60)
        async def report() -> dict[str, int]:
            n = env.hit("report")
            await asyncio.sleep(0.5)
            return {"n": n}

        return app

    other = TieredCache(
        [MemoryTier(), RedisTier(url=env.url, prefix=env.prefix)], namespace=env.namespace, clock=env.clock
    )

    async def both(a: str, b: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20) as client:
            return list(
                await asyncio.gather(*(client.get((a if i % 2 else b) + "/report") for i in range(20)))
            )

    with serve(make(env.http, env.cache)) as a, serve(make(HttpCache(other), other)) as b:
        responses = asyncio.run(both(a, b))
    assert {r.json()["n"] for r in responses} == {1}
    assert env.calls["report"] == 1  # one process loaded under the Redis lease, the other waited


def test_if_modified_since_when_there_is_no_if_none_match(env: Env) -> None:
    from email.utils import formatdate

    app = env.app()

    @app.get("/dated")
    @env.http.cached(max_age=60)
    async def dated() -> dict[str, int]:
        return {"n": env.hit("dated")}

    with serve(app) as base:
        first = get(base, "/dated")
        last_modified = first.headers["last-modified"]
        assert last_modified == formatdate(int(env.clock()), usegmt=True)
        assert get(base, "/dated", **{"If-Modified-Since": last_modified}).status_code == 304
        later = formatdate(env.clock() + 3600, usegmt=True)
        assert get(base, "/dated", **{"If-Modified-Since": later}).status_code == 304
        earlier = formatdate(env.clock() - 3600, usegmt=True)
        assert get(base, "/dated", **{"If-Modified-Since": earlier}).status_code == 200
        assert get(base, "/dated", **{"If-Modified-Since": "not a date"}).status_code == 200
        # If-None-Match decides alone when present: a stale validator there means 200
        both = {"If-Modified-Since": later, "If-None-Match": '"old"'}
        assert get(base, "/dated", **both).status_code == 200
    assert env.calls["dated"] == 1


def test_the_handlers_own_stale_if_error_applies_unless_must_revalidate(env: Env) -> None:
    app = env.app()
    mode = {"fail": False}

    def make(path: str, cache_control: str) -> None:
        @app.get(path)
        @env.http.cached(max_age=10)  # the rule has no stale window; the handler's answer does
        async def endpoint(response: fastapi.Response) -> Any:
            if mode["fail"]:
                return fastapi.responses.JSONResponse({"error": "down"}, status_code=503)
            response.headers["Cache-Control"] = cache_control
            return {"n": env.hit(path)}

    make("/lenient", "max-age=10, stale-if-error=600")
    make("/strict", "max-age=10, stale-if-error=600, must-revalidate")

    with serve(app) as base:
        assert get(base, "/lenient").json() == {"n": 1}
        assert get(base, "/strict").json() == {"n": 1}
        env.clock.advance(20)
        mode["fail"] = True
        assert get(base, "/lenient").json() == {"n": 1}  # the stale copy stands in for the 503
        assert get(base, "/strict").status_code == 503  # no stale copy for a must-revalidate answer


def test_without_install_the_decorators_do_nothing(env: Env) -> None:
    app = fastapi.FastAPI()  # install() not called

    @app.get("/bare")
    @env.http.cached(max_age=60)
    async def bare() -> dict[str, int]:
        return {"n": env.hit("bare")}

    with serve(app) as base:
        first = get(base, "/bare")
        assert first.json() == {"n": 1} and "etag" not in first.headers
        assert get(base, "/bare").json() == {"n": 2}
    env.cache.sync.close()
