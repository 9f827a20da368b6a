"""Real redis-server processes for tests: a killable standalone server, a 3-master cluster, a TCP proxy.

Every server listens on loopback only, with persistence off, in its own temp dir, and is stopped by
the PID this module started (never by name). Nothing here touches the shared 127.0.0.1:6379 server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence

from tests.faults.harness import FaultProxy

HOST = "127.0.0.1"
REDIS_SERVER = shutil.which("redis-server") or "redis-server"
REDIS_CLI = shutil.which("redis-cli") or "redis-cli"


def free_port(*, cluster_bus: bool = False) -> int:
    """A loopback port nobody listens on now (and ``port + 10000`` too, for a cluster node's bus)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if not cluster_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port found")


def ping(port: int, timeout: float = 0.2) -> bool:
    """True if a Redis answers PING on ``port`` (raw RESP, no client library involved)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def command(port: int, *args: str, timeout: float = 2.0) -> str:
    """Run one redis-cli command against a server this module started; returns its raw output."""
    out = subprocess.run(
        [REDIS_CLI, "-h", HOST, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return out.stdout


def commandstats(port: int) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls}, e.g. {"get": 3, "evalsha": 2}."""
    calls: dict[str, int] = {}
    for line in command(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_") :].partition(":")
            fields = dict(part.split("=", 1) for part in rest.strip().split(","))
            calls[name] = int(fields["calls"])
    return calls


class RedisServer:
    """One redis-server on a fixed loopback port; can be killed and restarted on the same port."""

    def __init__(self, port: int | None = None, *, extra: Sequence[str] = (), cluster: bool = False) -> None:
        self.port = port if port is not None else free_port(cluster_bus=cluster)
        self.dir = tempfile.mkdtemp(prefix=f"tc-redis-{self.port}-")
        self.extra = list(extra)
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, wait: float = 5.0) -> RedisServer:
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--daemonize",
            "no",
            "--logfile",
            os.path.join(self.dir, "redis.log"),
        ]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{self.port}.conf",
                "--cluster-node-timeout",
                "2000",
            ]
        args += self.extra
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + wait
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything gracefully."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def commandstats(self) -> dict[str, int]:
        return commandstats(self.port)

    def reset_stats(self) -> None:
        command(self.port, "CONFIG", "RESETSTAT")


class RedisClusterProcesses:
    """Three cluster-enabled masters joined with ``redis-cli --cluster create`` (no replicas)."""

    def __init__(self, masters: int = 3, *, extra: Sequence[str] = ()) -> None:
        self.nodes = [RedisServer(cluster=True, extra=extra) for _ in range(masters)]

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.nodes[0].port}/0"

    def start(self, wait: float = 15.0) -> RedisClusterProcesses:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *(f"{HOST}:{p}" for p in self.ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                check=True,
                timeout=30,
            )
            deadline = time.monotonic() + wait
            while not all("cluster_state:ok" in command(p, "CLUSTER", "INFO") for p in self.ports):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.cleanup()
            raise
        return self

    def commandstats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for port in self.ports:
            for name, calls in commandstats(port).items():
                total[name] = total.get(name, 0) + calls
        return total

    def reset_stats(self) -> None:
        for port in self.ports:
            command(port, "CONFIG", "RESETSTAT")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class TcpProxy(FaultProxy):
    """The fault proxy (``tests.faults.harness.FaultProxy``) with the two switches most tests use:
    ``stall()`` keeps connections open but forwards nothing (a hung server), ``passthrough()``
    forwards again; ``reset()`` aborts every open connection with an RST."""

    def stall(self) -> None:
        self.set_mode("stall")

    def passthrough(self) -> None:
        self.set_mode("pass")

    def reset(self) -> None:
        super().reset()
        self.set_mode("pass")  # new connections go through again


@contextlib.contextmanager
def running_server(**kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(**kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.cleanup()


def purge_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``<prefix>:`` (SCAN + UNLINK per key); returns how many were deleted.

    Tests use a unique prefix each, so this touches only their own keys, never the whole server.
    """
    import redis
    from redis.cluster import RedisCluster

    pattern = f"{prefix}:*"
    if url.startswith("redis+cluster://"):
        rc = RedisCluster.from_url(url.replace("redis+cluster://", "redis://", 1))
        try:
            keys = list(rc.scan_iter(match=pattern, count=1000))
            for k in keys:
                rc.unlink(k)
            return len(keys)
        finally:
            rc.close()
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.unlink(*keys)
        return len(keys)
    finally:
        client.close()


class CommandMonitor:
    """Counts the commands clients send to one server, via MONITOR on a raw socket.

    Unlike INFO commandstats, it can tell a client's own commands from those a Lua script runs
    (MONITOR tags those ``[0 lua]``), so ``client_commands()`` is exactly what went over the wire.
    """

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection((HOST, port), timeout=2)
        self._sock.sendall(b"*1\r\n$7\r\nMONITOR\r\n")
        self._buf = b""
        while b"\r\n" not in self._buf:
            self._buf += self._sock.recv(4096)
        ok, _, self._buf = self._buf.partition(b"\r\n")
        if ok != b"+OK":
            raise RuntimeError(f"MONITOR refused: {ok!r}")
        self.lines: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        self._sock.settimeout(0.05)
        while not self._stop:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self._buf += data
            *done, self._buf = self._buf.split(b"\r\n")
            self.lines += [line.decode("utf-8", "replace") for line in done]

    def stop(self, settle: float = 0.1) -> None:
        time.sleep(settle)  # let the last lines arrive
        self._stop = True
        self._thread.join(timeout=2)
        self._sock.close()

    def client_commands(self) -> list[str]:
        """Upper-cased command names sent by clients (script-internal calls left out)."""
        out = []
        for line in self.lines:
            head, sep, rest = line.partition("] ")
            if not sep or head.endswith(" lua"):
                continue
            name = rest.split(" ", 1)[0].strip('"').upper()
            out.append(name)
        return out


class RedisSentinelProcess:
    """One Sentinel (``redis-server <conf> --sentinel``) watching ``master_port`` as ``service``."""

    def __init__(self, master_port: int, service: str = "mymaster") -> None:
        self.port = free_port()
        self.service = service
        self.dir = tempfile.mkdtemp(prefix=f"tc-sentinel-{self.port}-")
        self.conf = os.path.join(self.dir, "sentinel.conf")
        with open(self.conf, "w") as f:  # Sentinel rewrites this file, so it lives in our temp dir
            f.write(
                f"port {self.port}\nbind {HOST}\ndir {self.dir}\n"
                f"sentinel monitor {service} {HOST} {master_port} 1\n"
                f"sentinel down-after-milliseconds {service} 5000\n"
            )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: float = 5.0) -> RedisSentinelProcess:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, self.conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + wait
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.cleanup()
                raise RuntimeError("redis sentinel did not start")
            time.sleep(0.01)
        return self

    def cleanup(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)
