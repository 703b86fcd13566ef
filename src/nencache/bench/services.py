"""Services a benchmark talks to: the user's own (from the config) or throwaway ones started for the run.

A throwaway redis-server or `nencache serve` binds 127.0.0.1 on a free port, keeps nothing on disk
and is stopped when the run ends. Every one is named in the report, so a figure always says whether
it came from the user's service or from one the benchmark started.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import yaml

_LISTENING = re.compile(r"listening on nencache://(\S+):(\d+)")


@dataclass(slots=True)
class Service:
    """A service URL and where it came from (`config`, or `started` by the benchmark)."""

    url: str
    origin: str
    port: int = 0

    def describe(self) -> str:
        return f"{self.url} ({'from the config' if self.origin == 'config' else 'started for this run'})"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | subprocess.Popen[str], what: str,
                  timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it listened")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Services:
    """Redis and a NenCache server for the run, started on first use and stopped by `close`."""

    def __init__(self, remote_url: str | None, p2p_index_url: str | None) -> None:
        self.remote_url, self.p2p_index_url = remote_url, p2p_index_url
        self._stack = ExitStack()
        self._redis: Service | None = None
        self._server: Service | None = None

    def redis(self) -> Service | None:
        """The config's Redis (`remote_url` redis://, else `p2p_index_url`), else a throwaway redis-server,
        else None (no redis-server installed)."""
        if self._redis is None:
            for url in (self.remote_url, self.p2p_index_url):
                if url and url.startswith(("redis://", "valkey://", "unix://")):
                    self._redis = Service(url, "config")
                    break
            else:
                started = self._start_redis()
                self._redis = started
        return self._redis

    def server(self) -> Service | None:
        """The config's NenCache server (`remote_url` nencache://), else a `nencache serve` started here."""
        if self._server is None:
            if self.remote_url and self.remote_url.startswith("nencache://"):
                self._server = Service(self.remote_url, "config")
            else:
                self._server = self._start_server()
        return self._server

    def close(self) -> None:
        self._stack.close()

    def _start_redis(self) -> Service | None:
        exe = shutil.which("redis-server")
        if exe is None:
            return None
        port = free_port()
        directory = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="nencache-bench-redis-"))
        proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                                 "--dir", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._stack.callback(stop, proc)
        wait_for_port(port, proc, "redis-server")
        return Service(f"redis://127.0.0.1:{port}", "started", port)

    def _start_server(self, pool: str = "1GiB") -> Service:
        directory = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="nencache-bench-server-")))
        config = directory / "server.yaml"
        config.write_text(yaml.safe_dump({"cpu_size": pool, "server_admin_port": None}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
        proc = subprocess.Popen([sys.executable, "-m", "nencache.cli", "serve", "--port", "0", "--admin-port", "-1",
                                 "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=env)
        self._stack.callback(stop, proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"nencache serve exited with status {proc.wait()} before it listened")
            match = _LISTENING.search(line)
            if match:
                port = int(match.group(2))
                return Service(f"nencache://127.0.0.1:{port}", "started", port)
        raise RuntimeError("nencache serve did not start within 60s")
