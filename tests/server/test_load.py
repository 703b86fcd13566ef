"""Load: 32 concurrent clients doing mixed get / put / exists for NENCACHE_LOAD_SECONDS (default 10).

Zero errors, every hit bit-exact, and the server's RSS stays within its pool size plus a stated
overhead of 320 MiB (the interpreter with torch and numpy is ~225 MiB here; the rest is for
connection buffers, indexes and allocator slack), and grows by at most 64 MiB over the run (the pool
is mapped at start-up). Keys outnumber pool pages, so eviction runs all along.
Clients use a 5 s timeout: 32 clients share 2 cores with the server here, and the test is about the
server's answers, not about how long one client may wait.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator

import psutil
import pytest

from nencache.format import ChunkHeader
from nencache.tiers.remote import ServerTier
from tests.server.util import ServerProcess
from tests.tiers.contract import make_key

pytestmark = pytest.mark.slow

CLIENTS = 32
SECONDS = float(os.environ.get("NENCACHE_LOAD_SECONDS", "10"))
POOL = 256 << 20
OVERHEAD = 320 << 20
GROWTH = 64 << 20
KEYS = 2000
PAYLOADS = 32


@pytest.fixture(scope="module")
def load_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("load"), {"cpu_size": POOL, "server_max_chunk_bytes": "1MiB",
                                                           "server_max_request_bytes": "8MiB"})
    proc.start()
    yield proc
    proc.kill()


class Corpus:
    """The one valid blob of every key: a header naming the key over one of a few random payloads."""

    def __init__(self) -> None:
        rng = random.Random(5)
        self.payloads = [rng.randbytes(rng.randrange(16 << 10, (1 << 20) - 64)) for _ in range(PAYLOADS)]
        self.crcs = [zlib.crc32(p) for p in self.payloads]

    def blob(self, index: int) -> bytes:
        payload, crc = self.payloads[index % PAYLOADS], self.crcs[index % PAYLOADS]
        return ChunkHeader(0, 3, 1, 1, 1, 1, len(payload), crc, make_key(index)).pack() + payload


class Client(threading.Thread):
    def __init__(self, url: str, seed: int, corpus: Corpus, until: float) -> None:
        super().__init__(daemon=True)
        self.tier = ServerTier(url, "load", timeout=5.0)
        self.rng, self.corpus, self.until = random.Random(seed), corpus, until
        self.ops = {"get": 0, "put": 0, "exists": 0}
        self.bad: list[str] = []
        self.moved = 0

    def run(self) -> None:
        rng = self.rng
        while time.monotonic() < self.until:
            start = rng.randrange(KEYS)
            indexes = [(start + i) % KEYS for i in range(rng.randrange(1, 9))]
            keys = [make_key(i) for i in indexes]
            roll = rng.random()
            if roll < 0.4:
                for index, blob in zip(indexes, self.tier.get(keys)):
                    if blob is not None:
                        self.moved += len(blob)
                        if bytes(blob) != self.corpus.blob(index):
                            self.bad.append(f"key {index}: wrong bytes")
                self.ops["get"] += 1
            elif roll < 0.7:
                blobs = [self.corpus.blob(i) for i in indexes[:4]]
                self.tier.put(list(zip(keys[:4], blobs)))
                self.moved += sum(len(b) for b in blobs)
                self.ops["put"] += 1
            else:
                found = self.tier.contains_prefix(keys)
                if not 0 <= found <= len(keys):
                    self.bad.append(f"exists answered {found} for {len(keys)} keys")
                self.ops["exists"] += 1


def test_32_clients_mixed_load(load_server: ServerProcess) -> None:
    server = psutil.Process(load_server.pid)
    baseline, deadline = -1, time.monotonic() + 10
    while time.monotonic() < deadline:  # the server maps its pool in the background after start-up
        now = server.memory_info().rss
        if abs(now - baseline) < 1 << 20:
            break
        baseline = now
        time.sleep(0.3)
    corpus = Corpus()
    until = time.monotonic() + SECONDS
    clients = [Client(load_server.url, seed, corpus, until) for seed in range(CLIENTS)]
    assert all(c.tier.is_up for c in clients)
    started = time.monotonic()
    for client in clients:
        client.start()
    peak = baseline
    while any(c.is_alive() for c in clients):
        peak = max(peak, server.memory_info().rss)
        time.sleep(0.25)
    elapsed = time.monotonic() - started
    for client in clients:
        client.join()

    bad = [b for c in clients for b in c.bad]
    assert not bad, bad[:5]
    errors = {i: c.tier.stats().errors for i, c in enumerate(clients) if c.tier.stats().errors}
    assert not errors, f"client errors: {errors}"
    assert all(c.tier.is_up for c in clients)
    stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{load_server.admin_port}/stats", timeout=5).read())
    assert stats["server"]["errors"] == {}, stats["server"]["errors"]
    assert stats["memory"]["evicted_chunks"] > 0
    limit = POOL + OVERHEAD
    assert peak <= limit, f"server RSS peaked at {peak / 2**20:.0f} MiB, over {limit / 2**20:.0f} MiB"
    assert peak - baseline <= GROWTH, f"server RSS grew by {(peak - baseline) / 2**20:.0f} MiB under load"
    ops = {name: sum(c.ops[name] for c in clients) for name in ("get", "put", "exists")}
    moved = sum(c.moved for c in clients)
    print(f"\n{CLIENTS} clients, {elapsed:.1f}s: {ops} = {sum(ops.values()) / elapsed:.0f} ops/s, "
          f"{moved / elapsed / 1e9:.2f} GB/s of chunks, 0 errors; server RSS {baseline / 2**20:.0f} MiB at start, "
          f"peak {peak / 2**20:.0f} MiB (limit {limit / 2**20:.0f} MiB = pool {POOL >> 20} MiB + "
          f"{OVERHEAD >> 20} MiB); evicted {stats['memory']['evicted_chunks']} chunks")
    for client in clients:
        client.tier.close()
