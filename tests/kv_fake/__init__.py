"""A local fake of Cloudflare's Workers KV REST API for tests, validated against the OpenAPI text."""

from .observer import RetryAfterWitness
from .server import ACCOUNT_ID, NAMESPACE_ID, TOKEN, FakeKV, Record

__all__ = ["ACCOUNT_ID", "NAMESPACE_ID", "TOKEN", "FakeKV", "Record", "RetryAfterWitness"]
