"""The server as a process: SIGTERM, kill -9 and restart, sharing between KVCaches, admin endpoint, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from nencache.cache import KVCache
from nencache.config import CacheConfig
from nencache.layout import KVLayout
from nencache.net.protocol import Op
from nencache.tiers.disk.tier import DiskTier
from nencache.tiers.remote import ServerTier
from tests.server.util import ServerProcess, chunk_blob, raw_connect, read_frame, request, wait_for
from tests.tiers.contract import make_blob, make_key


def items(n: int, start: int = 0, tokens: int = 64) -> list[tuple[bytes, bytes]]:
    return [(make_key(i), make_blob(make_key(i), tokens=tokens, seed=i)) for i in range(start, start + n)]


def test_sigterm_finishes_in_flight_flushes_disk_and_exits_0(tmp_path: Path, server_process: ServerProcess) -> None:
    server_process.config["disk_path"] = str(tmp_path / "disk")
    server_process.start()
    namespace = "ab" * 16
    tier = ServerTier(server_process.url, namespace, timeout=5.0)
    stored = items(20)
    tier.put(stored)
    key = make_key(500)
    late = chunk_blob(key, os.urandom(300_000))
    frame = request(Op.PUT, 77, namespace.encode(), [key], [late])
    with raw_connect(server_process.port, timeout=10) as sock:
        sock.sendall(frame[: len(frame) // 2])  # a frame in flight when SIGTERM comes
        time.sleep(0.2)
        server_process.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        time.sleep(0.5)
        assert server_process.proc.poll() is None, "the server quit with a request in flight"  # type: ignore[union-attr]
        sock.sendall(frame[len(frame) // 2 :])
        reply, _, _ = read_frame(sock)  # type: ignore[misc]
        assert reply.request_id == 77 and reply.count == 1 and not reply.is_error
        assert read_frame(sock) is None  # then the server closes
    assert server_process.proc.wait(30) == 0  # type: ignore[union-attr]
    assert "disk tier flushed" in server_process.log()
    tier.close()
    disk = DiskTier(str(tmp_path / "disk"), namespace, 1 << 30)
    try:
        got = disk.get([k for k, _ in stored] + [key])
        assert [bytes(g) if g is not None else None for g in got] == [b for _, b in stored] + [late]
    finally:
        disk.close()


def test_killed_server_gives_misses_then_recovers(server_process: ServerProcess) -> None:
    server_process.start()
    tier = ServerTier(server_process.url, "kill-test", timeout=0.25)
    first = items(4)
    tier.put(first)
    assert tier.contains_prefix([k for k, _ in first]) == 4
    server_process.kill()
    started = time.monotonic()
    assert tier.get([k for k, _ in first]) == [None] * 4
    assert tier.contains_prefix([k for k, _ in first]) == 0
    tier.put(items(2, start=10))
    tier.delete([first[0][0]])
    tier.clear()
    assert not tier.is_up and time.monotonic() - started < 3.0
    quick = time.monotonic()
    for _ in range(100):
        assert tier.get([first[0][0]]) == [None]
    assert time.monotonic() - quick < 0.5, "calls while the server is down must be immediate misses"
    server_process.start()  # same port
    wait_for(lambda: tier.is_up, 15.0, "the tier to reconnect")
    tier.put(first)
    assert [bytes(g) for g in tier.get([k for k, _ in first])] == [b for _, b in first]  # type: ignore[arg-type]
    assert tier.stats().errors >= 1
    tier.close()


READER = """
import sys, torch
from nencache.cache import KVCache
from nencache.config import CacheConfig
from nencache.layout import KVLayout
config = CacheConfig(chunk_size=16, cpu_size="16MiB", remote_url=sys.argv[1], remote_timeout=5.0)
layout = KVLayout(2, 2, 8, torch.bfloat16)
kv = torch.randn(layout.shape(100), generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
with KVCache(config, layout, "model-x") as cache:
    assert cache.lookup(list(range(100))) == 100, cache.lookup(list(range(100)))
    out = cache.retrieve(list(range(100)))
    assert torch.equal(out.view(torch.int16), kv.view(torch.int16)), "KV differs"
    assert cache.stats()["lower_hits"] > 0
    with KVCache(config, layout, "model-y") as other:
        assert other.lookup(list(range(100))) == 0
print("bit-exact")
"""


def test_kvcache_shares_through_the_server_across_processes(server_process: ServerProcess) -> None:
    server_process.start()
    config = CacheConfig(chunk_size=16, cpu_size="16MiB", remote_url=server_process.url, remote_timeout=5.0)
    layout = KVLayout(2, 2, 8, torch.bfloat16)
    kv = torch.randn(layout.shape(100), generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    with KVCache(config, layout, "model-x") as cache:
        cache.store(list(range(100)), kv)
        assert cache.flush(30)
    done = subprocess.run([sys.executable, "-c", READER, server_process.url], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0 and "bit-exact" in done.stdout, done.stderr[-2000:]


def test_admin_endpoint_and_stats_command(server_process: ServerProcess) -> None:
    server_process.start()
    tier = ServerTier(server_process.url, "admin", timeout=5.0, shared_memory=False)
    tier.put(items(3))
    tier.get([make_key(0), make_key(99)])
    base = f"http://127.0.0.1:{server_process.admin_port}"
    assert urllib.request.urlopen(base + "/healthz", timeout=5).read() == b"ok\n"
    metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    for name in ("nencache_server_requests_total{op=\"get\"} 1.0", "nencache_server_hits_total 1.0",
                 "nencache_server_misses_total 1.0", "nencache_server_evictions_total",
                 "nencache_server_request_seconds_bucket{le=", "nencache_server_pool_capacity_bytes",
                 "nencache_server_pool_used_bytes", "nencache_server_received_bytes_total",
                 "nencache_server_errors_total"):
        assert name in metrics, name
    stats = json.loads(urllib.request.urlopen(base + "/stats", timeout=5).read())
    assert stats["memory"]["stored_chunks"] == 3 and stats["server"]["requests"]["put"] == 1
    done = subprocess.run([sys.executable, "-m", "nencache.cli", "stats", "--url", base], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "server.requests.put" in done.stdout and "memory.stored_chunks" in done.stdout
    tier.close()


def test_embedded_defaults_without_a_config(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_", "XDG_"))}
    env["HOME"] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "nencache.cli", "serve", "--port", "0", "--admin-port", "-1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert "embedded defaults" in first and "1 GiB memory pool" in first
        assert str(tmp_path / ".cache" / "nencache" / "server") in first
        assert "listening on nencache://127.0.0.1:" in second
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
