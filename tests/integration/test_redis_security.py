"""RedisTier's secrets, failure reports, health check, TLS (host names) and ACL permissions."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.redis_servers import RedisServer, command, free_port
from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.adapters.redis import RedisTier
from tiercache.adapters.redis_bus import RedisBus

pytestmark = pytest.mark.redis

DOCS = Path(__file__).resolve().parents[2] / "docs" / "tiers" / "redis.md"
SECRET = "s3cr3t-Pw"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@127.0.0.1:6379/0",
        f"redis://app:{SECRET}@127.0.0.1:6379/0",
        f"redis://127.0.0.1:6379/0?password={SECRET}",
        f"redis://127.0.0.1:6379/0?db=0&password={SECRET}&ssl_password={SECRET}",
        f"rediss://app:{SECRET}@127.0.0.1:6379/0?ssl_password={SECRET}&ssl_ca_certs=/x.pem",
        f"redis://127.0.0.1:6379/0?Password={SECRET}&auth_token={SECRET}",
    ],
)
def test_no_password_form_is_shown(url: str) -> None:
    tier = RedisTier(url)
    cache = TieredCache([MemoryTier(), tier], namespace="sec")
    bus = RedisBus(url=url)
    shown = [repr(tier), repr(cache), repr(bus._tier), str(cache.tiers)]
    for text in shown:
        assert SECRET not in text
        assert "127.0.0.1:6379" in text
        assert "***" in text
    assert "ssl_ca_certs=/x.pem" in repr(RedisTier(url)) or "ssl_ca_certs" not in url


def test_a_bad_url_is_reported_with_address_and_cause_never_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    url = f"redis://:{SECRET}@127.0.0.1:{port}/0?password={SECRET}"
    cache = TieredCache([MemoryTier(), RedisTier(url)], namespace="bad")
    caplog.set_level(logging.WARNING, logger="tiercache")
    try:
        assert cache.sync.get_cached("k", lambda: 1) == 1
        assert cache.sync.get_cached("k2", lambda: 2) == 2
        warnings = [r.getMessage() for r in caplog.records if r.name == "tiercache.redis"]
        assert len(warnings) == 1, warnings  # one per outage, not one per call
        assert f"127.0.0.1:{port}" in warnings[0] and "refused" in warnings[0].lower()
        assert all(SECRET not in r.getMessage() for r in caplog.records)
        checks = cache.sync.check()
        assert [(c.tier, c.ok) for c in checks] == [("memory", True), ("redis", False)]
        assert f"127.0.0.1:{port}" in (checks[1].reason or "") and SECRET not in (checks[1].reason or "")
        assert "ConnectionError" in (checks[1].reason or "")

        async def main() -> None:
            caplog.clear()
            assert await cache.get_cached("a", _one) == 1
            warned = [r.getMessage() for r in caplog.records if r.name == "tiercache.redis"]
            assert len(warned) <= 1 and all(SECRET not in w for w in warned)
            checks = await cache.check()
            assert [c.ok for c in checks] == [True, False]
            assert f"127.0.0.1:{port}" in (checks[1].reason or "")
            await cache.aclose()

        asyncio.run(main())
    finally:
        cache.sync.close()


async def _one() -> int:
    return 1


def test_check_reports_a_live_server(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    cache = TieredCache([MemoryTier(), RedisTier(redis_server.url)], namespace="ok")
    try:
        assert [(c.tier, c.ok, c.reason) for c in cache.sync.check()] == [
            ("memory", True, None),
            ("redis", True, None),
        ]

        async def main() -> None:
            assert all(c.ok for c in await cache.check())

        asyncio.run(main())
        # the server goes away: a warning naming it; it comes back: "connects again"
        caplog.set_level(logging.WARNING, logger="tiercache")
        redis_server.kill()
        assert cache.sync.get_cached("x", lambda: 1) == 1
        assert not cache.sync.check()[1].ok
        redis_server.start()
        cache.sync.get_cached("y", lambda: 2)
        text = [r.getMessage() for r in caplog.records if r.name == "tiercache.redis"]
        assert any("cannot connect" in t and str(redis_server.port) in t for t in text), text
        assert any("connects again" in t for t in text), text
        assert cache.sync.check()[1].ok
    finally:
        cache.sync.close()


# --- TLS with a CA made here -------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki() -> Iterator[Path]:
    if shutil.which("openssl") is None:
        pytest.fail("the TLS test needs the openssl command")
    root = Path(tempfile.mkdtemp(prefix="tc-pki-"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=tc-test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=root)  # fmt: skip
    for name, san in (
        ("good", "DNS:localhost,IP:127.0.0.1"),
        ("other", "DNS:other.example"),
        ("client", "DNS:app.example"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=root)  # fmt: skip
        (root / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=root)  # fmt: skip
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _tls_server(pki: Path, cert: str, auth_clients: str = "no") -> tuple[RedisServer, int]:
    tls_port = free_port()
    server = RedisServer(
        extra=[
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(pki / f"{cert}.pem"),
            "--tls-key-file",
            str(pki / f"{cert}.key"),
            "--tls-ca-cert-file",
            str(pki / "ca.pem"),
            "--tls-auth-clients",
            auth_clients,
        ]
    ).start()
    return server, tls_port


def test_tls_with_a_ca_works_and_a_certificate_for_another_host_is_refused(pki: Path) -> None:
    server, port = _tls_server(pki, "good")
    try:
        for host in ("localhost", "127.0.0.1"):
            tier = RedisTier(f"rediss://{host}:{port}/0?ssl_ca_certs={pki / 'ca.pem'}", prefix="tls")
            cache = TieredCache([MemoryTier(), tier], namespace="tls")
            assert cache.sync.check()[1].ok
            cache.sync.set("k", {"v": 1})
            assert tier.get("tls:k") is not None

            async def main(c: TieredCache = cache) -> None:
                assert (await c.check())[1].ok
                assert await c.get("k") == {"v": 1}
                await c.aclose()

            asyncio.run(main())
            cache.sync.close()
        # without the CA the server's certificate is not trusted
        bare = TieredCache([RedisTier(f"rediss://localhost:{port}/0")], namespace="tls")
        reason = bare.sync.check()[0].reason or ""
        assert "certificate verify failed" in reason
        bare.sync.close()
    finally:
        server.cleanup()
    server, port = _tls_server(pki, "other")
    try:
        tier = RedisTier(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki / 'ca.pem'}", prefix="tls")
        cache = TieredCache([tier], namespace="tls")
        check = cache.sync.check()[0]
        assert not check.ok
        assert re.search(r"(IP address|[Hh]ostname) mismatch", check.reason or ""), check.reason

        async def refused() -> None:
            assert not (await cache.check())[0].ok
            assert await cache.get_cached("k", _one) == 1  # a miss and a load, never an error
            await cache.aclose()

        asyncio.run(refused())
        cache.sync.close()
    finally:
        server.cleanup()


def test_tls_with_a_client_certificate(pki: Path) -> None:
    server, port = _tls_server(pki, "good", auth_clients="yes")
    try:
        ca = str(pki / "ca.pem")
        without = TieredCache([RedisTier(f"rediss://localhost:{port}/0?ssl_ca_certs={ca}")], namespace="tls")
        assert not without.sync.check()[0].ok  # the server wants a client certificate
        without.sync.close()
        tier = RedisTier(
            f"rediss://localhost:{port}/0",
            client_kwargs={
                "ssl_ca_certs": ca,
                "ssl_certfile": str(pki / "client.pem"),
                "ssl_keyfile": str(pki / "client.key"),
            },
        )
        cache = TieredCache([tier], namespace="tls")
        assert cache.sync.check()[0].ok
        assert cache.sync.get_cached("k", lambda: 5) == 5

        async def main() -> None:
            assert (await cache.check())[0].ok
            assert await cache.get("k") == 5
            await cache.aclose()

        asyncio.run(main())
        cache.sync.close()
    finally:
        server.cleanup()


# --- ACL: the documented user can do everything the tier does ----------------------------------


def _documented_acl() -> list[str]:
    text = DOCS.read_text()
    block = re.search(r"```text\n(ACL SETUSER [^\n]+)\n```", text)
    assert block is not None, "docs/tiers/redis.md lost its ACL block"
    return block.group(1).split()


def test_the_documented_acl_user_runs_every_tier_operation(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    acl = _documented_acl()
    assert command(redis_server.port, *acl).strip() == "OK"
    user, password = acl[2], acl[4][1:]
    url = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"
    tier = RedisTier(url)
    cache = TieredCache([MemoryTier(), tier], namespace="acl", bus=RedisBus.for_tier(tier))
    other = TieredCache([MemoryTier(), RedisTier(url)], namespace="acl")
    try:
        assert password not in repr(cache)
        assert all(c.ok for c in cache.sync.check())
        assert cache.sync.get_cached("a", lambda: 1) == 1  # GET, lease + re-read, write + release
        assert other.sync.get_cached("a", lambda: 2) == 1
        cache.sync.set("b", 2, tags=("t",))
        assert other.sync.get("b") == 2
        cache.sync.expire("b")
        cache.sync.invalidate_tags("t")
        cache.sync.delete("a")
        assert cache.sync.get_many_cached(["c", "d"], lambda keys: {k: k for k in keys}) == {
            "c": "c",
            "d": "d",
        }
        cache.sync.clear()

        async def main() -> None:
            assert all(c.ok for c in await cache.check())
            assert await cache.get_cached("e", _one) == 1
            assert await cache.get("e") == 1
            await cache.aclose()

        asyncio.run(main())
        assert cache.stats.tiers[1].errors == 0, cache.stats.snapshot()
        assert other.stats.tiers[1].errors == 0, other.stats.snapshot()
        assert not [r.getMessage() for r in caplog.records if "Permission" in r.getMessage()]
        # and nothing outside the prefix
        forbidden = RedisTier(url, prefix="elsewhere")
        assert TieredCache([forbidden]).sync.check()[0].ok  # PING is allowed
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden.set("x:y", _entry())
        forbidden.close()
    finally:
        cache.sync.close()
        other.sync.close()


def _entry() -> object:
    from tiercache.testing import make_entry

    return make_entry("x:y", 1, time.time())
