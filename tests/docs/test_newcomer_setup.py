"""What a fresh clone needs: the distribution name used everywhere, nothing read from outside
the repository (``.ci/fresh-clone`` runs the README's commands on a real fresh clone)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIST = "tiercache-py"


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    paths = [ROOT / n for n in names.splitlines()]
    return [
        p
        for p in paths
        if p.is_file() and not p.is_symlink() and p.suffix in {".py", ".md", ".toml", ".yml", ".js", ""}
    ]


def test_the_distribution_name_is_used_everywhere() -> None:
    assert re.search(rf'^name = "{DIST}"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    wrong = re.compile(r"pip install (?:-\S+ )*['\"]?tiercache(?:\[|['\"\s]|$)")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in tracked_text_files()
        for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if wrong.search(line) and "installs an unrelated project" not in line
    ]
    assert offenders == [], f"install hints naming the other project's distribution: {offenders}"


def test_nothing_reads_outside_the_repository() -> None:
    outside = re.compile(r"\.\./shared|/work/shared|parents\[\d\]\.parent")
    offenders = [
        str(p.relative_to(ROOT))
        for p in tracked_text_files()
        if p.name not in (Path(__file__).name, "fresh-clone")
        and outside.search(p.read_text(encoding="utf-8", errors="replace"))
    ]
    assert offenders == []
    assert (ROOT / "tests" / "data" / "cloudflare-kv-openapi.json").is_file()
