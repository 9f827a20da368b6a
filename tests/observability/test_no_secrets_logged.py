"""The ``tiercache`` loggers (and events, spans, exceptions) never carry a secret: a Redis password
from the URL or a Cloudflare API token, through connection failures, auth errors, 5xx, 429 and
breaker trips, with every logger at DEBUG."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tiercache import Event, TieredCache
from tiercache.adapters.cloudflare_kv import CloudflareKVTier
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier
from tiercache.otel import instrument

REDIS_PASSWORD = "pw-" + uuid.uuid4().hex
CF_TOKEN = "cf-token-" + uuid.uuid4().hex


@pytest.fixture
def everything(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)  # root: tiercache.*, redis, httpx, everything
    yield caplog


def leaked(secret: str, caplog: pytest.LogCaptureFixture, events: list[Event], extra: list[str]) -> list[str]:
    """Every place the secret shows up (empty: none)."""
    places = []
    if secret in caplog.text:
        places.append("log text")
    for record in caplog.records:
        if secret in record.getMessage():
            places.append(f"log record {record.name}")
    for event in events:
        if secret in repr(event) or (event.error is not None and secret in str(event.error)):
            places.append(f"event {event.kind}")
    places.extend(f"text {i}" for i, text in enumerate(extra) if secret in text)
    return places


def exercise(cache: TieredCache, errors: list[str]) -> None:
    """Reads, writes, loads and deletes, sync and async, swallowing (and recording) what escapes."""
    for i in range(6):
        try:
            cache.sync.get_cached(f"k{i}", functools.partial(int, i))
            cache.sync.set(f"s{i}", i)
            cache.sync.delete(f"s{i}")
        except Exception as exc:
            errors.extend([str(exc), repr(exc)])

    async def run() -> None:
        for i in range(3):
            try:
                await cache.get_cached(f"a{i}", functools.partial(int, i))
                await cache.delete(f"a{i}")
            except Exception as exc:
                errors.extend([str(exc), repr(exc)])
        await cache.aclose()

    asyncio.run(run())


def spans_text(exporter: InMemorySpanExporter) -> str:
    return "\n".join(s.to_json() for s in exporter.get_finished_spans())


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0",  # nothing listens: connection refused
        f"redis://someone:{REDIS_PASSWORD}@127.0.0.1:6379/0",  # real server, wrong credentials
    ],
    ids=["refused", "auth-error"],
)
def test_redis_password_never_logged(everything: pytest.LogCaptureFixture, url: str) -> None:
    events: list[Event] = []
    tier = RedisTier(
        url=url, socket_timeout=0.05, connect_timeout=0.05, prefix=f"tcsecret{uuid.uuid4().hex[:6]}"
    )
    cache = TieredCache([MemoryTier(), tier], on_event=events.append, breaker_cooldown=0.0, namespace="sec")
    exporter = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(cache, tracer_provider=tracers, metrics=False)
    errors: list[str] = [repr(tier), str(tier), repr(cache)]
    exercise(cache, errors)
    assert any(e.kind == "tier_error" for e in events), "the scenario must make the tier fail"
    assert leaked(REDIS_PASSWORD, everything, events, [*errors, spans_text(exporter)]) == []


def cloudflare_failures(echo_token: bool) -> Any:
    """A KV API that fails every way it can: 500, 429 with Retry-After, 403, a dropped connection;
    with ``echo_token``, its error messages quote the Authorization header back (a misbehaving
    proxy, a debugging middleware)."""
    state = {"n": 0}

    def handle(request: httpx.Request) -> httpx.Response:
        state["n"] += 1
        said = request.headers.get("authorization") if echo_token else "Authentication error"
        echo = {"errors": [{"code": 10000, "message": f"bad auth: {said}"}]}
        match state["n"] % 4:
            case 0:
                return httpx.Response(500, json={"success": False, **echo, "messages": [], "result": None})
            case 1:
                return httpx.Response(429, headers={"Retry-After": "0"}, json={"success": False, **echo})
            case 2:
                return httpx.Response(403, json={"success": False, **echo, "messages": [], "result": None})
            case _:
                raise httpx.ConnectError(f"connection reset ({said})")

    return handle


@pytest.mark.parametrize(
    "echo_token",
    [False, True],
    ids=["cloudflare-errors", "server-echoes-token"],
)
def test_cloudflare_token_never_logged(everything: pytest.LogCaptureFixture, echo_token: bool) -> None:
    events: list[Event] = []
    handler = cloudflare_failures(echo_token)
    tier = CloudflareKVTier(
        account_id="0" * 32,
        namespace_id="1" * 32,
        api_token=CF_TOKEN,
        retries=1,
        backoff=0.0,
        deadline=0.5,
        default_retry_after=0.0,
        transport=httpx.MockTransport(handler),
        async_transport=httpx.MockTransport(handler),
    )
    cache = TieredCache([MemoryTier(), tier], on_event=events.append, breaker_cooldown=0.0, namespace="sec")
    exporter = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(cache, tracer_provider=tracers, metrics=False)
    errors: list[str] = [repr(tier), str(tier), repr(cache), repr(vars(tier))]
    exercise(cache, errors)
    assert any(e.kind == "tier_error" for e in events), "the scenario must make the tier fail"
    assert leaked(CF_TOKEN, everything, events, [*errors, spans_text(exporter)]) == []
