"""The public surface: a static __all__, a fast import with no optional dependency, the adapters guard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tiercache

ROOT = Path(__file__).resolve().parents[2]


def test_all_is_pinned() -> None:
    assert tiercache.__all__ == [
        "AsyncCachedFunction",
        "AsyncCachedManyFunction",
        "Bus",
        "BusMessage",
        "CacheClosedError",
        "CachedFunction",
        "CachedManyFunction",
        "Codec",
        "ConfigurationError",
        "Entry",
        "Event",
        "EventHook",
        "EventKind",
        "InvalidKeyError",
        "JsonCodec",
        "LoadContext",
        "LeaseTier",
        "LoaderTimeoutError",
        "Lookup",
        "SerializationError",
        "Source",
        "SyncTieredCache",
        "Tier",
        "TierBinding",
        "TierCacheError",
        "TierError",
        "TieredCache",
        "ValueTooLargeError",
        "current_load",
        "tiered_cache",
        "tiered_cache_many",
    ]
    for name in tiercache.__all__:
        obj = getattr(tiercache, name)
        if getattr(obj, "__module__", "").startswith("tiercache"):  # not the EventHook type alias
            assert obj.__doc__, f"{name} has no docstring"


def test_import_pulls_in_no_optional_dependency() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import tiercache"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stderr
    imported = {line.split("|")[-1].strip() for line in out.splitlines() if "|" in line}
    for optional in ("redis", "httpx", "pydantic", "fakeredis", "pytest", "cachetools"):
        assert optional not in imported, f"import tiercache imported {optional}"


def test_errors_are_one_hierarchy_and_keep_builtin_meaning() -> None:
    assert issubclass(tiercache.SerializationError, TypeError)
    assert issubclass(tiercache.InvalidKeyError, ValueError)
    assert issubclass(tiercache.LoaderTimeoutError, TimeoutError)
    for name in (
        "ConfigurationError",
        "InvalidKeyError",
        "SerializationError",
        "TierError",
        "ValueTooLargeError",
        "LoaderTimeoutError",
    ):
        assert issubclass(getattr(tiercache, name), tiercache.TierCacheError)


def test_importing_the_adapters_folder_directly_fails_clearly() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import adapters"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "import them as 'tiercache.adapters'" in result.stderr


def test_every_module_has_a_docstring() -> None:
    for path in [*ROOT.joinpath("tiercache").glob("*.py"), *ROOT.joinpath("adapters").glob("*.py")]:
        source = path.read_text()
        assert source.lstrip().startswith('"""'), f"{path.name} has no module docstring"


def test_import_loads_no_submodule_until_a_name_is_used() -> None:
    code = (
        "import sys, tiercache; eager = sorted(m for m in sys.modules if m.startswith('tiercache.'));"
        "print(eager); from tiercache import TieredCache; assert 'tiercache._cache' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert result.stdout.strip() == "[]"


def test_unknown_attribute_is_an_attribute_error() -> None:
    import pytest

    with pytest.raises(AttributeError):
        tiercache.NoSuchThing  # noqa: B018
