"""Fetch Django's source distribution (for its tests/cache suite) from the package index, once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path


def cache_dir() -> Path:
    """Where sdists and extracted suites are kept between runs (TIERCACHE_DJANGO_SDIST_DIR)."""
    env = os.environ.get("TIERCACHE_DJANGO_SDIST_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tiercache-tests" / "django"


def suite_dir(version: str) -> Path:
    """A directory holding the ``cache`` test package of Django ``version`` (downloaded and
    extracted on first use). Raises RuntimeError, with pip's output, when it cannot be fetched."""
    root = cache_dir()
    target = root / f"django-{version}-tests"
    if (target / "cache" / "tests.py").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    names = [f"django-{version}.tar.gz", f"Django-{version}.tar.gz"]  # PEP 625 name, older one
    found = [root / n for n in names if (root / n).is_file()]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--dest", str(root), f"django=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = [root / n for n in names if (root / n).is_file()]
        if proc.returncode != 0 or not found:
            raise RuntimeError(
                f"could not fetch the Django {version} sdist from the package index "
                f"({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}"
            )
    partial = root / f"django-{version}-tests.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    sdist = found[0]
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/", 1)[0]  # django-X or Django-X
        member_prefix = f"{top}/tests/cache/"
        members = [m for m in tar.getmembers() if m.name.startswith(member_prefix) and m.isfile()]
        if not any(m.name == member_prefix + "tests.py" for m in members):
            raise RuntimeError(f"{sdist} holds no tests/cache/tests.py")
        for m in members:
            m.name = "cache/" + m.name[len(member_prefix) :]
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                tar.extract(m, partial, filter="data")
            else:  # plain files with names rewritten under cache/ above
                tar.extract(m, partial)
    try:
        partial.replace(target)
    except OSError:  # another run extracted it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return target


if __name__ == "__main__":  # python -m tests.contrib_django.sdist [version]: pre-fetch (CI)
    import django

    print(suite_dir(sys.argv[1] if len(sys.argv) > 1 else django.__version__))
