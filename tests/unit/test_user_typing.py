"""A user's program outside the repository, type-checked with ``mypy --strict`` against the
installed package (the README's install): it finds ``tiercache`` and ``tiercache.adapters``, and
decorated functions keep their signatures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROGRAM = textwrap.dedent(
    """
    from datetime import timedelta

    from tiercache import TieredCache, tiered_cache, tiered_cache_many
    from tiercache.adapters.memory import MemoryTier
    from tiercache.adapters.redis import RedisTier

    cache = TieredCache([MemoryTier(), RedisTier(url="redis://127.0.0.1:6379/0")], ttl="1h")


    @tiered_cache(cache, key="user:{user_id}", ttl=timedelta(minutes=5))
    def get_user(user_id: int, verbose: bool = False) -> dict[str, int]:
        return {"id": user_id}


    @tiered_cache(cache, ttl="90s")
    async def get_order(order_id: str) -> list[str]:
        return [order_id]


    @tiered_cache_many(cache, key="price:{}")
    async def get_prices(ids: list[int]) -> dict[int, float]:
        return {i: 1.0 for i in ids}


    @tiered_cache_many(cache, key="name:{}")
    def get_names(ids: list[str]) -> dict[str, str]:
        return {i: i for i in ids}


    reveal_type(get_user)
    reveal_type(get_order)
    reveal_type(get_prices)
    reveal_type(get_names)
    reveal_type(get_names(["a"]))
    get_user("not an int")
    """
)


@pytest.mark.slow
def test_mypy_strict_sees_the_decorated_signatures(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(PROGRAM)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--cache-dir", ".cache", "app.py"],
        cwd=tmp_path,  # outside the repository: only the installed package can answer
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    out += (
        "\n(a strict editable install links the modules that existed when it ran: after adding or "
        "removing one, run the README's install again)"
    )
    assert "Cannot find implementation or library stub" not in out, (
        "mypy cannot see tiercache: install it as the README says "
        "(pip install -e '.[dev]' --config-settings editable_mode=strict)\n" + out
    )
    notes = [line.split("Revealed type is ", 1)[1] for line in out.splitlines() if "Revealed type" in line]
    assert notes == [
        '"tiercache._decorator.CachedFunction[[user_id: int, verbose: bool =], dict[str, int]]"',
        '"tiercache._decorator.AsyncCachedFunction[[order_id: str], list[str]]"',
        '"tiercache._decorator.AsyncCachedManyFunction[int, float]"',
        '"tiercache._decorator.CachedManyFunction[str, str]"',
        '"dict[str, str]"',
    ], out
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1 and 'Argument 1 to "__call__" of "CachedFunction"' in errors[0], out
