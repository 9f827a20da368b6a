"""Client-side witness of Retry-After: httpx transports that log when each request left the tier.

The fake judges Retry-After on *arrival*, which on a loaded 2-core machine can trail the client's
decision to send by the better part of a second (the fake shares the test process's GIL). The
question the tests ask is about the client: after it has read a 429, does it send again before the
Retry-After has run? These transports wrap the tier's own and log, on the client's clock, when each
request entered the transport and when each answer came back, so the check needs no grace for
server-side delay, only ``slack`` for the few bytecodes between the tier's check and the transport.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class Exchange:
    sent: float  # monotonic, when the request entered the transport
    answered: float | None  # when the answer came back; None if the transport raised
    status: int | None
    retry_after: float | None  # seconds, from a 429's Retry-After


@dataclass
class RetryAfterWitness:
    """Shared log of both transports; ``violations`` is the verdict."""

    exchanges: list[Exchange] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def tier(self, fake: Any, **options: Any) -> Any:
        """A CloudflareKVTier on ``fake`` (a started FakeKV) whose requests this witness logs."""
        from tiercache.adapters.cloudflare_kv import CloudflareKVTier

        return CloudflareKVTier(
            account_id=fake.account_id,
            namespace_id=fake.namespace_id,
            api_token=fake.token,
            base_url=fake.base_url,
            transport=self.transport(),
            async_transport=self.async_transport(),
            **options,
        )

    def transport(self) -> httpx.BaseTransport:
        return _Sync(self, httpx.HTTPTransport())

    def async_transport(self) -> httpx.AsyncBaseTransport:
        return _Async(self, httpx.AsyncHTTPTransport())

    def record(self, sent: float, response: httpx.Response | None) -> None:
        answered = time.monotonic() if response is not None else None
        status = response.status_code if response is not None else None
        retry_after = None
        if response is not None and status == 429:
            header = response.headers.get("retry-after")
            retry_after = float(header) if header is not None else 60.0
        with self._lock:
            self.exchanges.append(Exchange(sent, answered, status, retry_after))

    def rate_limited(self) -> int:
        return sum(1 for e in self.exchanges if e.status == 429)

    def violations(self, slack: float = 0.25) -> list[tuple[float, float]]:
        """(429 read at, request sent at) for requests sent while a 429 the client had read ran.

        A request sent within ``slack`` of the 429 coming back may have passed the tier's check
        before the tier had parsed the answer (another thread or task); later ones may not.
        """
        with self._lock:
            exchanges = list(self.exchanges)
        found = []
        for block in exchanges:
            if block.answered is None or block.retry_after is None:
                continue
            read_at, until = block.answered, block.answered + block.retry_after
            found += [(read_at, e.sent) for e in exchanges if read_at + slack < e.sent < until]
        return found


class _Sync(httpx.BaseTransport):
    def __init__(self, witness: RetryAfterWitness, inner: httpx.BaseTransport) -> None:
        self._witness, self._inner = witness, inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        try:
            response = self._inner.handle_request(request)
        except BaseException:
            self._witness.record(sent, None)
            raise
        self._witness.record(sent, response)
        return response

    def close(self) -> None:
        self._inner.close()


class _Async(httpx.AsyncBaseTransport):
    def __init__(self, witness: RetryAfterWitness, inner: httpx.AsyncBaseTransport) -> None:
        self._witness, self._inner = witness, inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            self._witness.record(sent, None)
            raise
        self._witness.record(sent, response)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
