"""The API reference as built (``mkdocs build --strict``): every public name with its parameters,
EventKind's members, SyncTieredCache's methods, and no internals of ``tiercache/__init__``."""

from __future__ import annotations

import html
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tiercache
from tiercache.adapters.cloudflare_kv import CloudflareKVTier
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier
from tiercache.adapters.redis_bus import RedisBus

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra ([dev] installs it)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def page(site: Path, name: str) -> tuple[str, set[str]]:
    raw = (site / "reference" / name / "index.html").read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", " ", raw))
    return text, set(re.findall(r'id="([^"]+)"', raw))


def test_every_public_name_is_rendered(site: Path) -> None:
    text, ids = page(site, "tiercache")
    missing = [name for name in tiercache.__all__ if f"tiercache.{name}" not in ids]
    assert missing == []
    for internal in ("_EXPORTS", "__getattr__", "__dir__", "TYPE_CHECKING"):
        assert internal not in text


def test_classes_show_their_constructor_parameters(site: Path) -> None:
    text, ids = page(site, "tiercache")
    for param in inspect.signature(tiercache.TieredCache).parameters:
        assert param in text, f"TieredCache({param}=...) is not in the reference"
    kinds = [k for k in vars(tiercache.EventKind) if k.isupper()]
    assert kinds and all(f"tiercache.EventKind.{k}" in ids for k in kinds)
    methods = [m for m, v in vars(tiercache.SyncTieredCache).items() if callable(v) and not m.startswith("_")]
    assert {"get_cached", "lookup", "set", "delete", "close"} <= set(methods)
    assert all(f"tiercache.SyncTieredCache.{m}" in ids for m in methods)


@pytest.mark.parametrize("cls", [MemoryTier, RedisTier, RedisBus, CloudflareKVTier], ids=lambda c: c.__name__)
def test_tier_constructors_are_documented(site: Path, cls: type) -> None:
    text, _ = page(site, "adapters")
    for param in inspect.signature(cls).parameters:
        if param not in ("args", "kwargs", "tier_options"):
            assert param in text, f"{cls.__name__}({param}=...) is not in the reference"
