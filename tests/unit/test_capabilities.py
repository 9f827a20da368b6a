"""Declared tier capabilities: any in-process tier offering InlineL1 gets the inline hit path; the
core never probes undeclared attributes; the core's modules import each other without a circle."""

from __future__ import annotations

import ast
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import tiercache
from tiercache import TieredCache, tiered_cache
from tiercache.testing import FakeRemoteTier
from tiercache.tier import CountsOwnHits, Entry, InlineL1, SizeLimited, Tier, TierBinding

ROOT = Path(__file__).resolve().parents[2]


class _Mark:
    """A hit count the inline path advances with one attribute store (``visited = visited.next``)."""

    def __init__(self, count: int) -> None:
        self.count = count

    @property
    def next(self) -> _Mark:
        return _Mark(self.count + 1)


class _Slot:
    __slots__ = ("entry", "visited")

    def __init__(self, entry: Entry, visited: _Mark) -> None:
        self.entry = entry
        self.visited = visited


class DictL1:
    """A third-party in-process tier, written against tiercache.tier only."""

    name = "dict"
    in_process = True
    shared = False
    max_ttl: float | None = None

    def __init__(self) -> None:
        self.slots: dict[str, _Slot] = {}
        self.marks = (_Mark(0), _Mark(1))  # marks[1]: what an uncounted hit stores
        self.fast_lookup: Callable[[str], _Slot | None] = self.slots.get
        self.gets = 0

    def hit_count(self) -> int:
        return sum(s.visited.count for s in self.slots.values())

    def bind(self, binding: TierBinding) -> None:
        return None

    def get(self, key: str) -> Entry | None:
        self.gets += 1
        slot = self.slots.get(key)
        return None if slot is None else slot.entry

    def set(self, key: str, entry: Entry) -> None:
        self.slots[key] = _Slot(entry, self.marks[0])

    def delete(self, key: str, version: int) -> None:
        slot = self.slots.get(key)
        if slot is not None and slot.entry.version <= version:
            del self.slots[key]

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        return [self.get(k) for k in keys]

    def set_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        for k, e in items:
            self.set(k, e)

    def close(self) -> None:
        return None

    async def aget(self, key: str) -> Entry | None:
        return self.get(key)

    async def aset(self, key: str, entry: Entry) -> None:
        self.set(key, entry)

    async def adelete(self, key: str, version: int) -> None:
        self.delete(key, version)

    async def aget_many(self, keys: Sequence[str]) -> list[Entry | None]:
        return self.get_many(keys)

    async def aset_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        self.set_many(items)

    async def aclose(self) -> None:
        return None


def test_a_third_party_in_process_tier_gets_the_inline_hit_path() -> None:
    l1 = DictL1()
    assert isinstance(l1, Tier) and isinstance(l1, InlineL1) and isinstance(l1, CountsOwnHits)
    cache = TieredCache([l1, FakeRemoteTier()], ttl=60)
    calls = 0

    @tiered_cache(cache)
    def double(x: int) -> int:
        nonlocal calls
        calls += 1
        return 2 * x

    assert double(4) == 8
    gets = l1.gets
    for _ in range(5):
        assert double(4) == 8
        assert cache.sync.get_cached("k", lambda: "v") == "v"
    assert calls == 1
    # Hits after the first load were served inline: through fast_lookup, never Tier.get.
    assert l1.gets == gets + 1  # only the first get_cached("k") walked L1 through the driver
    assert cache.stats.tier_hits(0) == 9  # the tier's own count (CountsOwnHits), inline hits included

    async def main() -> str:
        return await cache.get_cached("k", lambda: "x")  # type: ignore[no-any-return]

    assert asyncio.run(main()) == "v"


def test_size_limits_are_declared_not_probed() -> None:
    remote = FakeRemoteTier(max_value_bytes=400)
    assert isinstance(remote, SizeLimited)
    cache = TieredCache([remote], ttl=60)
    cache.sync.set("small", "x")
    cache.sync.get_cached("big", lambda: "y" * 2000)  # too large for the tier: skipped, not raised
    assert cache.sync.get("small") == "x"
    assert cache.sync.get("big") is None


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_the_core_modules_have_no_import_circle() -> None:
    package = ROOT / "tiercache"
    graph = {f.stem: _imports(f) for f in package.glob("*.py")}
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join((*path[path.index(module) :], module)))
        if module in done:
            return
        for dep in graph[module]:
            if dep != "__init__":
                visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_fake_clock_imports_without_pytest() -> None:
    import subprocess

    code = "import sys; from tiercache.testing import FakeClock; FakeClock(); print('pytest' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False"
    assert tiercache.__name__ == "tiercache"


def test_core_probes_no_undeclared_tier_attribute() -> None:
    probed = ("fast_lookup", "marks", "hit_count", "max_value_bytes", "extend_lease", "offers_lease")
    for path in (ROOT / "tiercache").glob("_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                assert node.args[1].value not in probed, f"{path.name} probes {node.args[1].value!r}"


def test_every_subpackage_is_in_the_wheel() -> None:
    import re

    line = re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert line is not None
    listed = set(re.findall(r'"([^"]+)"', line.group(1)))
    found = {
        ".".join(("tiercache", *init.parent.relative_to(ROOT / "tiercache").parts))
        for init in (ROOT / "tiercache").rglob("__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject's list: {sorted(found - listed)}"
