"""The KV fake served on a real socket, validating all traffic against Cloudflare's OpenAPI.

``tiercache.testing.FakeCloudflareKV`` keeps the namespace, the limits and the faults; this
subclass serves it as a WSGI app on werkzeug's threaded server on a loopback port, so the tier's
real httpx clients, connection pools and timeouts are exercised, and validates every request and
every non-5xx response against the (minimally relaxed) OpenAPI description. Violations are
recorded in ``violations`` and the test fixtures fail on any. An injected timeout holds the
connection for ``timeout_delay`` seconds (the client has given up by then), then answers 500.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from tiercache.testing.kv import TIMED_OUT, FakeCloudflareKV, Item, Record, Reply, Route, _failure
from tiercache.testing.kv import KVStats as Stats

from .spec import API_ROOT, P, SpecRequest, SpecResponse, Validator, load_spec

__all__ = ["ACCOUNT_ID", "NAMESPACE_ID", "TOKEN", "FakeKV", "Item", "Record", "Stats"]

ACCOUNT_ID = "0123456789abcdef0123456789abcdef"
NAMESPACE_ID = "fedcba9876543210fedcba9876543210"
TOKEN = "test-token-Zq8rV4mN1xK7pL2s"  # a recognisable string the secrecy tests grep for


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


class FakeKV(FakeCloudflareKV):
    """The fake server. Use as a context manager or call ``start``/``stop``."""

    def __init__(
        self,
        *,
        account_id: str = ACCOUNT_ID,
        namespace_id: str = NAMESPACE_ID,
        token: str = TOKEN,
        spec: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(account_id=account_id, namespace_id=namespace_id, token=token, **options)
        self.validator = Validator(spec) if spec is not None else _default_validator()
        self.violations: list[str] = []
        self._server: BaseWSGIServer | None = None
        self._thread: Any = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeKV:
        self._server = make_server("127.0.0.1", 0, self, threaded=True, request_handler=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="kv-fake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeKV:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the fake first"
        return f"http://127.0.0.1:{self._server.server_port}{API_ROOT}"

    # --- WSGI -------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        status, headers, body = self._handle(environ)
        reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 413: "Too Large",
                  414: "URI Too Long", 429: "Too Many Requests", 500: "Internal Server Error"}  # fmt: skip
        headers = {**headers, "Content-Length": str(len(body))}
        start_response(f"{status} {reason.get(status, 'Status')}", list(headers.items()))
        return [body]

    def _handle(self, environ: dict[str, Any]) -> Reply:
        # Limits are judged on arrival time, before validation (which takes a variable while).
        arrival = time.monotonic()
        method = environ["REQUEST_METHOD"].upper()
        raw_uri = environ.get("REQUEST_URI") or environ.get("RAW_URI") or environ["PATH_INFO"]
        raw_path, _, raw_query = raw_uri.partition("?")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}
        content_type = environ.get("CONTENT_TYPE", "")
        if content_type:
            headers["Content-Type"] = content_type
        query = parse_qsl(raw_query, keep_blank_values=True)

        matched = self.route(raw_path)
        if not isinstance(matched, Route):
            self._violation(f"{method} {raw_path}: no such route, or a path that is not UTF-8")
            return matched
        route, params = matched.route, matched.params
        spec_req = SpecRequest(method, P + route, params, query, headers, body, content_type.lower())
        problem = self.validator.request(spec_req)
        if problem is not None:
            self._violation(f"request {method} {route}: {problem}")
            # The real API would answer 400; so does the fake (after recording the violation).
            return self._respond(spec_req, _failure(400, 10001, f"request does not match the API: {problem}"))
        reply = self.serve(method, matched, dict(query), headers, body, arrival)
        if reply is TIMED_OUT:
            time.sleep(self.timeout_delay)  # the client has given up by now
            return _failure(500, 10002, "injected timeout")
        return self._respond(spec_req, reply)

    def _respond(self, spec_req: SpecRequest, reply: Reply) -> Reply:
        status, headers, body = reply
        if status < 500:  # the description documents 200 and 4XX only
            problem = self.validator.response(spec_req, SpecResponse(status, headers, body))
            if problem is not None:
                self._violation(f"response {status} to {spec_req.method} {spec_req.path}: {problem}")
        return reply

    def _violation(self, text: str) -> None:
        with self._lock:
            self.violations.append(text[:2000])


@functools.cache
def _default_validator() -> Validator:
    """Parsing the description takes most of a second: do it once per test session."""
    return Validator(load_spec())
