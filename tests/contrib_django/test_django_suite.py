"""Django's own cache backend suite (BaseCacheTests from the pinned Django's sdist) against real Redis.

The sdist is fetched from the package index on first use (cached in ``~/.cache/tiercache-tests``);
if it cannot be fetched this test fails, it never skips. The suite runs in a subprocess (Django's
settings are process-global): once through the sync methods, once through the async ones.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("TieredCacheBackendTests", "AsyncTieredCacheBackendTests")
# Tests of the suite that do not apply, with the reason (docs/django.md lists the same).
EXCLUDED = {
    "test_cull": "culling (MAX_ENTRIES/CULL_FREQUENCY) is the db/file/locmem backends'; Redis evicts",
    "test_zero_cull": "as test_cull",
    "test_cull_delete_when_store_empty": "as test_cull",
}
MIN_TESTS_PER_CLASS = 50  # Django 5.2's BaseCacheTests has 54


@pytest.fixture(scope="module")
def suite_results(shared_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    try:
        import django
    except ImportError:
        pytest.fail("Django is not installed: pip install -e '.[dev]' (the dev extra pins it)")
    from tests.contrib_django.sdist import suite_dir

    try:
        tests_dir = suite_dir(django.__version__)
    except Exception as exc:  # loud: the suite must run in CI
        pytest.fail(f"cannot get Django's cache test suite: {exc}")
    out = tmp_path_factory.mktemp("django-suite") / "results.json"
    namespace = f"djsuite{uuid.uuid4().hex[:12]}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.contrib_django.run_suite",
            str(tests_dir),
            shared_redis_url,
            namespace,
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0 or not out.is_file():
        pytest.fail(
            f"the Django suite runner failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-8000:]}"
        )
    results: dict[str, object] = json.loads(out.read_text())
    results["namespace"] = namespace
    return results


def _by_class(results: dict[str, object]) -> dict[str, dict[str, dict[str, str]]]:
    tests = results["tests"]
    assert isinstance(tests, dict)
    grouped: dict[str, dict[str, dict[str, str]]] = {c: {} for c in CLASSES}
    for test_id, outcome in tests.items():
        cls, name = test_id.split(".")[-2:]
        grouped[cls][name] = outcome
    return grouped


@pytest.mark.parametrize("cls", CLASSES)
def test_django_base_cache_tests_pass(suite_results: dict[str, object], cls: str) -> None:
    tests = _by_class(suite_results)[cls]
    assert len(tests) >= MIN_TESTS_PER_CLASS, sorted(tests)
    bad = {n: o for n, o in tests.items() if n not in EXCLUDED and o["outcome"] != "passed"}
    assert not bad, "\n\n".join(f"{n}: {o['outcome']}\n{o['detail']}" for n, o in sorted(bad.items()))
    skipped = {n for n, o in tests.items() if o["outcome"] == "skipped"}
    assert skipped == set(EXCLUDED)
    passed = sum(o["outcome"] == "passed" for o in tests.values())
    print(f"Django {suite_results['django']} {cls}: {len(tests)} tests, {passed} ok, {len(skipped)} excluded")


def test_suite_leaves_no_keys(suite_results: dict[str, object], shared_redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(shared_redis_url)
    try:
        left = list(client.scan_iter(match=f"*{suite_results['namespace']}*", count=1000))
    finally:
        client.close()
    assert left == []


def test_docs_list_every_exclusion() -> None:
    page = (ROOT / "docs" / "django.md").read_text()
    for name in EXCLUDED:
        assert re.search(rf"`{name}`", page), f"docs/django.md does not list the excluded {name}"


def test_docs_state_the_counts(suite_results: dict[str, object]) -> None:
    """docs/django.md says how many tests run, pass and are excluded, for the pinned version."""
    page = (ROOT / "docs" / "django.md").read_text()
    found = re.search(
        r"With Django (\S+), each run has\s+(\d+) tests; (\d+) pass and (\d+) are excluded", page
    )
    assert found, "docs/django.md lost its sentence with the suite's counts"
    for cls, tests in _by_class(suite_results).items():
        passed = sum(o["outcome"] == "passed" for o in tests.values())
        assert (len(tests), passed, len(EXCLUDED)) == tuple(int(g) for g in found.groups()[1:]), cls
    version = str(suite_results["django"])
    assert version.startswith(found.group(1)), (version, found.group(1))


def test_installed_django_is_the_pinned_one() -> None:
    import django

    pin = re.search(r'"django==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml's dev extra must pin django==X (the suite fetched is that version's)"
    assert django.__version__ == pin.group(1)
