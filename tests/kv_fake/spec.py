"""Loads Cloudflare's KV OpenAPI description (tests/data/) and validates traffic against it."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

# The Workers KV extract of cloudflare/api-schemas' openapi.json, kept in the repository so a fresh
# clone tests as is (its source commit is in the document's info.description; tests/data/README.md).
SPEC_PATH = Path(
    os.environ.get(
        "TIERCACHE_KV_OPENAPI",
        Path(__file__).resolve().parents[1] / "data" / "cloudflare-kv-openapi.json",
    )
)

API_HOST = "https://api.cloudflare.com"
API_ROOT = "/client/v4"
P = "/accounts/{account_id}/storage/kv/namespaces/{namespace_id}"


def load_spec(path: Path = SPEC_PATH) -> dict[str, Any]:
    """The document as published. Missing file: FileNotFoundError (the fixture fails, never skips)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Cloudflare KV OpenAPI description not found at {path}; the KV fake validates every "
            "request against it (restore tests/data/cloudflare-kv-openapi.json from git or set "
            "TIERCACHE_KV_OPENAPI)"
        )
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


def relaxed(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with the four mismatches with the real API (listed below) relaxed.

    1. ``readOnly`` on the identifier schemas rejects them as path parameters: dropped.
    2. ``DELETE …/values/{key}`` declares a required body nobody sends: made optional.
    3. bulk get: missing keys are ``null`` (the value schema lacks ``nullable``), and the result's
       ``oneOf`` matches both branches for ordinary results: nullable, and ``anyOf``.
    4. the bulk routes' 4XX schema demands ``success: true``; real failures send the ordinary
       failure envelope: either is accepted.
    Nothing else is touched; the file on disk is never modified.
    """
    doc = copy.deepcopy(dict(spec))
    schemas = doc["components"]["schemas"]
    for name in ("workers-kv_identifier", "workers-kv_namespace_identifier"):
        schemas[name].pop("readOnly", None)
    paths = doc["paths"]
    paths[P + "/values/{key_name}"]["delete"]["requestBody"]["required"] = False
    values = schemas["workers-kv_bulk-get-result"]["properties"]["values"]
    # OpenAPI 3.0 ``nullable`` needs a ``type`` beside it, so null is added as its own branch.
    null = {"type": "object", "nullable": True, "maxProperties": 0}
    values["additionalProperties"] = {"anyOf": [values["additionalProperties"], null]}
    get_result = paths[P + "/bulk/get"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    for part in get_result["allOf"]:
        result = part.get("properties", {}).get("result")
        if result is not None and "oneOf" in result:
            result["anyOf"] = result.pop("oneOf")
    failure = {"$ref": "#/components/schemas/workers-kv_api-response-common-failure"}
    for sub, method in (("/bulk", "put"), ("/bulk", "delete"), ("/bulk/delete", "post")):
        media = paths[P + sub][method]["responses"]["4XX"]["content"]["application/json"]
        media["schema"] = {"anyOf": [media["schema"], failure]}
    return doc


class SpecRequest:
    """openapi-core's request protocol, with the route already matched (``path_pattern``).

    The fake routes on the raw, percent-encoded path and hands openapi-core the *decoded* path
    parameters, which is what the schema's ``maxLength: 512`` is about.
    """

    def __init__(
        self,
        method: str,
        path_pattern: str,
        path_params: Mapping[str, str],
        query: list[tuple[str, str]],
        headers: Mapping[str, str],
        body: bytes,
        content_type: str,
    ) -> None:
        self.host_url = API_HOST
        self.method = method.lower()
        self.path_pattern = API_ROOT + path_pattern
        self.path = self.path_pattern
        self.body = body
        self.content_type = content_type
        self.parameters = RequestParameters(
            path=dict(path_params),
            query=ImmutableMultiDict(query),
            header=Headers(list(headers.items())),
            cookie=ImmutableMultiDict(),
        )


class SpecResponse:
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = Headers(list(headers.items()))
        self.data = body
        self.content_type = headers.get("Content-Type", "").lower()


class Validator:
    """Validates requests and responses; returns a description of each violation, or None."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self._api = OpenAPI.from_dict(relaxed(spec))

    def request(self, req: SpecRequest) -> str | None:
        result = self._api.unmarshal_request(req)
        if result.errors:
            return "; ".join(_describe(e) for e in result.errors)
        return None

    def response(self, req: SpecRequest, resp: SpecResponse) -> str | None:
        result = self._api.unmarshal_response(req, resp)
        if result.errors:
            return "; ".join(_describe(e) for e in result.errors)
        return None


def _describe(exc: BaseException) -> str:
    parts = [f"{type(exc).__name__}: {exc}"]
    for sub in getattr(exc, "schema_errors", None) or ():
        parts.append(str(getattr(sub, "message", sub))[:300])
    cause = exc.__cause__
    if cause is not None:
        parts.append(_describe(cause))
    return " / ".join(parts)
