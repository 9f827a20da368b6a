"""examples/lambda_handler.py: invocations each run asyncio.run; the second is served from cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from types import ModuleType

EVENT = {"queryStringParameters": {"currency": "USD"}}


def test_two_invocations_second_from_cache(load_example: Callable[[str], ModuleType]) -> None:
    ex = load_example("lambda_handler")
    first = ex.handler(EVENT, None)
    second = ex.handler(EVENT, None)  # a new event loop: the Redis tier must not use a closed one
    assert first["statusCode"] == second["statusCode"] == 200
    assert json.loads(first["body"]) == json.loads(second["body"]) == {"currency": "USD", "rate": 1.08}
    assert first["headers"]["x-cache"] == "LOADED"
    assert second["headers"]["x-cache"] == "L1"
    assert ex.loads["count"] == 1

    cold = load_example("lambda_handler")  # a new container: empty L1, same Redis
    third = cold.handler(EVENT, None)
    assert third["headers"]["x-cache"] == "L2"
    assert cold.loads["count"] == 0
