"""Docs that run: every fenced code block in README.md and docs/ is run here, or marked on purpose.

The rules (docs/development.md repeats them for writers):

* A page's Python blocks, in order, form one program, run in a fresh interpreter against the
  shared Redis (top-level ``await`` allowed, as in ``python -m asyncio``). Every ``namespace="x"``
  gets a unique suffix, and the keys under it are deleted afterwards.
* docs/quickstart.md is stricter: its blocks, pasted in order into a file, are a complete program
  that ``python file.py`` runs (no top-level ``await``).
* Any other block (shell, JavaScript, PromQL, JSON...) or a Python block that cannot run here (it
  needs a Cloudflare account, say) carries ``<!-- not run: <why> -->`` on the line before it.
  Blocks checked by a dedicated test say so the same way (``not run: ... checked by tests/...``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
MARK = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\S*)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, when marked

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, lang = opening.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.search(previous)
        body = "\n".join(line[len(indent) :] for line in lines[i + 1 : end])
        found.append(Block(page, i + 1, lang, body, mark.group(1) if mark else None))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks_of(page)]


def test_the_collector_sees_the_docs() -> None:
    assert len(ALL) > 30 and any(b.page.name == "quickstart.md" for b in ALL)


@pytest.mark.parametrize("block", [b for b in ALL if b.lang != "python"], ids=Block.where)
def test_every_other_block_is_marked_on_purpose(block: Block) -> None:
    assert block.not_run, (
        f"{block.where()}: a ```{block.lang or '(no language)'} block is neither run by a test nor "
        "marked <!-- not run: why --> on the line before it"
    )


RUNNER = textwrap.dedent(
    """
    import ast, asyncio, sys
    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, {"__name__": "__main__"})
    if asyncio.iscoroutine(result):
        asyncio.run(result)
    """
)


def run_program(source: str, label: str, redis_url: str, tmp: Path, *, top_level_await: bool) -> str:
    """Run ``source`` as a file (tracebacks show its lines) from a directory outside the repository."""
    suffix = uuid.uuid4().hex[:10]
    source = re.sub(r'namespace="([^"]+)"', lambda m: f'namespace="{m.group(1)}-{suffix}"', source)
    program = tmp / (label.replace("/", "_") + ".py")
    program.write_text(source, encoding="utf-8")
    # the repository first on the path: the sources as they are now, whatever the install saw
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", RUNNER, str(program)] if top_level_await else [sys.executable, str(program)]
    try:
        done = subprocess.run(argv, env=env, cwd=tmp, capture_output=True, text=True, timeout=120)
    finally:
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"*{suffix}*", count=1000):
            client.unlink(key)
        client.close()
    assert done.returncode == 0, f"{label} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks_of(page) if b.lang == "python" and not b.not_run]


RUNNABLE = [p for p in PAGES if python_blocks(p) and p.name != "quickstart.md"]


@pytest.mark.redis
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_of_a_page_run_in_order(page: Path, shared_redis_url: str, tmp_path: Path) -> None:
    blocks = python_blocks(page)
    source = "\n\n".join(f"# --- {b.where()}\n{b.code}" for b in blocks)
    run_program(source, str(page.relative_to(ROOT)), shared_redis_url, tmp_path, top_level_await=True)


@pytest.mark.redis
def test_the_quickstart_is_one_complete_program(shared_redis_url: str, tmp_path: Path) -> None:
    """Pasted in order into a file, the quickstart's blocks run with plain ``python``."""
    page = ROOT / "docs" / "quickstart.md"
    blocks = python_blocks(page)
    assert len(blocks) >= 5 and all(b.not_run is None for b in blocks if b.lang == "python")
    source = "\n\n".join(b.code for b in blocks)
    out = run_program(source, "docs/quickstart.md", shared_redis_url, tmp_path, top_level_await=False)
    assert "quickstart ok" in out


def test_the_documented_envelope_is_what_the_codec_writes() -> None:
    from tiercache import JsonCodec
    from tiercache._entry import Entry

    block = next(b for b in blocks_of(ROOT / "docs" / "cloudflare-kv.md") if b.lang == "json")
    documented = json.loads(block.code)
    entry = Entry(
        documented["k"],
        documented["v"],
        created_at=documented["c"],
        fresh_until=documented["f"],
        stale_until=documented["s"],
        tags=tuple(documented["t"]),
        version=documented["n"],
        delta=documented["d"],
    )
    assert json.loads(JsonCodec().dumps(entry)) == documented


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "js"], ids=Block.where)
def test_javascript_in_the_docs_is_the_tested_worker(block: Block) -> None:
    assert block.code.strip() in (ROOT / "examples" / "worker.js").read_text(encoding="utf-8")
