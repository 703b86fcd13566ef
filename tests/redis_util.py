"""Throwaway redis-server processes for tests: standalone, password, unix socket, 3-node cluster.

Each server binds 127.0.0.1 on a free port (or a unix socket) with persistence off. Import the
fixtures into a test module: `from tests.redis_util import redis_server, redis_cluster  # noqa: F401` (tests/tiers/conftest.py does).
Without a redis-server binary the tests are skipped, unless the CI variable is set: then they fail.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def require_redis() -> tuple[str, str]:
    """Paths of redis-server and redis-cli; skip (or fail under CI) when they are not installed."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server, cli
    message = "redis-server/redis-cli not on PATH: install them (apt-get install redis-server) to run the Redis tests"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set, so a missing binary is a failure)")
    pytest.skip(message)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster_bus: bool = False) -> int:
    """A port free on 127.0.0.1 (and port + 10000 too, for a cluster node's bus)."""
    for _ in range(500):
        port = random.randint(20000, 45000)
        if _bindable(port) and (not cluster_bus or _bindable(port + 10000)):
            return port
    raise RuntimeError("no free port found on 127.0.0.1")


def _answers(port: int | None, unix: str | None, tls: bool = False) -> bool:
    try:
        with (socket.create_connection(("127.0.0.1", port), 0.5) if unix is None
              else socket.socket(socket.AF_UNIX)) as raw:
            raw.settimeout(0.5)
            if unix is not None:
                raw.connect(unix)
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            sock = ctx.wrap_socket(raw) if tls else raw
            sock.sendall(b"PING\r\n")
            return sock.recv(64)[:1] in (b"+", b"-")  # -NOAUTH also means it is up
    except OSError:
        return False


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl CLI); skips if openssl is missing."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not on PATH: cannot make a test certificate for the TLS test")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert),
                    "-days", "2"], check=True, capture_output=True, timeout=60)
    return cert, key


@dataclass
class RedisServer:
    """One redis-server child process; `kill()` is SIGKILL, `start()` again reuses the same port."""

    directory: Path
    port: int = 0
    unix: str | None = None
    extra: list[str] = field(default_factory=list)
    tls: tuple[Path, Path] | None = None  # (certificate, key): serve TLS only, on `port`
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.unix}" if self.unix and not self.port else f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        server, _ = require_redis()
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [server, "--bind", "127.0.0.1", "--port", str(0 if self.tls else self.port), "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        if self.tls:
            cert, key = map(str, self.tls)
            args += ["--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                     "--tls-ca-cert-file", cert, "--tls-auth-clients", "no"]
        if self.unix:
            args += ["--unixsocket", self.unix, "--unixsocketperm", "700"]
        self.proc = subprocess.Popen(args + self.extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _answers(self.port or None, None if self.port else self.unix, self.tls is not None):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log = (self.directory / "redis.log")
                raise RuntimeError(f"redis-server did not start: {log.read_text()[-800:] if log.exists() else ''}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cli(self, *args: str) -> str:
        _, cli = require_redis()
        where = ["-s", self.unix] if self.unix and not self.port else ["-p", str(self.port)]
        return subprocess.run([cli, *where, *args], check=False, capture_output=True, text=True, timeout=30).stdout


def start_server(directory: Path, extra: list[str] | None = None, unix: bool = False, tcp: bool = True,
                 cluster_bus: bool = False, tls: tuple[Path, Path] | None = None) -> RedisServer:
    """Start a server on a fresh free port, retrying on a port race with another process."""
    for attempt in range(5):
        server = RedisServer(directory, free_port(cluster_bus) if tcp else 0,
                             str(directory / "redis.sock") if unix else None, list(extra or []), tls)
        try:
            server.start()
            return server
        except RuntimeError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


@dataclass
class RedisClusterProcs:
    """A real Redis Cluster of three masters on loopback (no replicas)."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


def start_cluster(directory: Path, size: int = 3, timeout: float = 30.0) -> RedisClusterProcs:
    _, cli = require_redis()
    extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"]
    nodes = []
    try:
        for i in range(size):
            nodes.append(start_server(directory / f"node{i}", extra, cluster_bus=True))
        create = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
             "--cluster-yes"], check=False, capture_output=True, text=True, timeout=60)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-800:]} {create.stderr[-800:]}")
        deadline = time.monotonic() + timeout
        while not all("cluster_state:ok" in n.cli("cluster", "info") for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return RedisClusterProcs(nodes)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A standalone server on a free port with a unix socket too, shared by a test module."""
    require_redis()
    with tempfile.TemporaryDirectory(prefix="nencache-redis-") as tmp:
        server = start_server(Path(tmp), unix=True)
        yield server
        server.kill()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterProcs]:
    """A three-node Redis Cluster shared by a test module."""
    require_redis()
    with tempfile.TemporaryDirectory(prefix="nencache-rcluster-") as tmp:
        cluster = start_cluster(Path(tmp))
        yield cluster
        cluster.kill()
