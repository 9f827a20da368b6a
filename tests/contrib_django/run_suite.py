"""Run Django's own ``BaseCacheTests`` against TieredCacheBackend: sync, and again through the a-methods.

Run in a subprocess by ``test_django_suite.py`` (Django's settings are process-global)::

    python -m tests.contrib_django.run_suite <dir holding cache/> <redis url> <namespace> <out.json>

The second class runs every test of the suite through the backend's native async methods: the
suite's module-level ``cache``/``caches`` are swapped for a face whose ``get``/``set``/... call
``aget``/``aset``/... (through ``async_to_sync``, a new event loop per call).
"""

from __future__ import annotations

import json
import sys
import traceback
import unittest
from typing import Any
from unittest import mock

BACKEND = "tiercache.contrib.django.TieredCacheBackend"
# The suite's aliases that configure culling (MAX_ENTRIES/CULL_FREQUENCY), which this backend
# does not do (Redis evicts by its maxmemory policy); without them the cull tests skip themselves.
EXCLUDED_ALIASES = {"cull", "zero_cull"}
_ASYNC = {
    "add",
    "clear",
    "close",
    "decr",
    "decr_version",
    "delete",
    "delete_many",
    "get",
    "get_many",
    "get_or_set",
    "has_key",
    "incr",
    "incr_version",
    "set",
    "set_many",
    "touch",
}


class _AsyncFace:
    """A cache whose sync names call the backend's async methods."""

    def __init__(self, alias: str) -> None:
        object.__setattr__(self, "_alias", alias)

    def _backend(self) -> Any:
        from django.core.cache import caches

        return caches[object.__getattribute__(self, "_alias")]

    def __getattr__(self, name: str) -> Any:
        from asgiref.sync import async_to_sync

        backend = self._backend()
        if name in _ASYNC:
            return async_to_sync(getattr(backend, "a" + name))
        return getattr(backend, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._backend(), name, value)

    def __contains__(self, key: Any) -> bool:
        from asgiref.sync import async_to_sync

        return bool(async_to_sync(self._backend().ahas_key)(key))


class _AsyncCaches:
    def __getitem__(self, alias: str) -> _AsyncFace:
        from django.core.cache import caches

        caches[alias]  # InvalidCacheBackendError for an alias that is not configured
        return _AsyncFace(alias)


class _Recorder(unittest.TextTestResult):
    """Keeps one outcome per test id (a failed subtest fails its test)."""

    outcomes: dict[str, dict[str, str]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes = {}

    def _put(self, test: Any, outcome: str, detail: str = "") -> None:
        tid = test.id()
        old = self.outcomes.get(tid)
        if old is not None and old["outcome"] in ("failed", "error") and outcome == "passed":
            return
        self.outcomes[tid] = {"outcome": outcome, "detail": detail}

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._put(test, "passed")

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._put(test, "failed", self._exc_info_to_string(err, test))

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        self._put(test, "error", self._exc_info_to_string(err, test))

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        self._put(test, "skipped", reason)

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "failed" if issubclass(err[0], test.failureException) else "error"
            self.outcomes[test.id()] = {
                "outcome": kind,
                "detail": f"{subtest.id()}\n{self._exc_info_to_string(err, test)}",
            }

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._put(test, "passed", "expected failure")

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self._put(test, "failed", "unexpected success")


def main(tests_dir: str, redis_url: str, namespace: str, out_path: str) -> int:
    sys.path.insert(0, tests_dir)
    import django
    from django.conf import settings

    options = {"NAMESPACE": namespace, "REDIS": {"socket_timeout": 2.0}}  # a loaded CI machine
    settings.configure(
        SECRET_KEY="tiercache-django-suite-" + namespace,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "cache"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        CACHES={"default": {"BACKEND": BACKEND, "LOCATION": redis_url, "OPTIONS": options}},
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        USE_TZ=True,
    )
    django.setup()
    import cache.tests as suite  # the package extracted from Django's sdist
    from django.core.cache import caches
    from django.test import TestCase, override_settings
    from django.test.utils import get_runner

    caches_setting = suite.caches_setting_for_tests(
        base={"BACKEND": BACKEND, "LOCATION": redis_url, "OPTIONS": options},
        exclude=EXCLUDED_ALIASES,
    )

    @override_settings(CACHES=caches_setting)
    class TieredCacheBackendTests(suite.BaseCacheTests, TestCase):  # type: ignore[misc]
        """Django's BaseCacheTests, unchanged, through the sync methods."""

    class AsyncTieredCacheBackendTests(TieredCacheBackendTests):
        """The same tests through the native async methods (aget, aset, aadd, aincr...)."""

        def setUp(self) -> None:
            super().setUp()
            patcher = mock.patch.multiple(suite, cache=_AsyncFace("default"), caches=_AsyncCaches())
            patcher.start()
            self.addCleanup(patcher.stop)

    loader = unittest.TestLoader()
    tests = unittest.TestSuite(
        [
            loader.loadTestsFromTestCase(TieredCacheBackendTests),
            loader.loadTestsFromTestCase(AsyncTieredCacheBackendTests),
        ]
    )
    runner_class = get_runner(settings)
    django_runner = runner_class(verbosity=0, interactive=False)
    django_runner.setup_test_environment()
    old_config = django_runner.setup_databases()
    try:
        result = unittest.TextTestRunner(stream=sys.stderr, verbosity=1, resultclass=_Recorder).run(tests)
    finally:
        django_runner.teardown_databases(old_config)
        django_runner.teardown_test_environment()
        try:
            caches["default"].clear()  # this run's namespace only
        except Exception:
            traceback.print_exc()
    assert isinstance(result, _Recorder)
    with open(out_path, "w") as out:
        json.dump({"django": django.__version__, "tests": result.outcomes}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
