"""Load an example module fresh (a cold start) with its environment: real Redis, a unique namespace."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def namespace() -> str:
    return f"ex{uuid.uuid4().hex[:10]}"


@pytest.fixture
def load_example(
    monkeypatch: pytest.MonkeyPatch, shared_redis_url: str, namespace: str
) -> Iterator[Callable[[str], ModuleType]]:
    """``load_example("fastapi_app")``: import examples/fastapi_app.py as a new module, with
    REDIS_URL pointing at the shared test Redis and CACHE_NAMESPACE unique to the test."""
    monkeypatch.setenv("REDIS_URL", shared_redis_url)
    monkeypatch.setenv("CACHE_NAMESPACE", namespace)
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        module_name = f"_example_{name}_{uuid.uuid4().hex[:8]}"
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pydantic look their module up
        loaded.append(module_name)
        spec.loader.exec_module(module)
        return module

    yield load
    for module_name in loaded:
        module = sys.modules.pop(module_name, None)
        cache = getattr(module, "cache", None)
        if cache is not None:
            cache.sync.close()
