"""Cheap denial of service, scaled to a few seconds each: the server keeps serving a good client throughout.

Each attack runs from 127.0.0.2 (another client address: Linux routes all of 127/8 to loopback) against
a server in a child process, while a good client on 127.0.0.1 reads and writes its own chunks over the
socket. The good client must see no miss, no error and no stall (every call well inside its timeout);
the attacker's connections must be cut by the deadlines and limits, never left open.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nencache.net.protocol import HEADER_SIZE, Frame, Op, pack_keyed_meta
from nencache.tiers.remote import ServerTier
from tests.server.util import ServerProcess, attacker_socket, chunk_blob, request
from tests.tiers.contract import make_key

TOKEN = "attack-token"
BASE = {"cpu_size": "64MiB", "server_max_chunk_bytes": "1MiB", "server_max_request_bytes": "8MiB",
        "server_io_timeout": 1.0, "server_idle_timeout": 2.0, "server_auth_timeout": 1.0,
        "server_max_connections": 128, "server_max_client_connections": 8}


def start_server(tmp_path: Path, **changes: object) -> ServerProcess:
    return ServerProcess(tmp_path, BASE | changes).start()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path)
    yield proc
    proc.kill()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True once the server has closed `sock` (end of stream or reset), waiting at most `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            return False
        except OSError:
            return True
        if not data:
            return True
    return False


class GoodClient(threading.Thread):
    """Reads its 16 chunks over and over, and stores a new one every few rounds; records every failure."""

    CHUNKS = 16

    def __init__(self, url: str, token: str | None = None) -> None:
        super().__init__(daemon=True)
        self.tier = ServerTier(url, "good", timeout=3.0, auth_token=token, shared_memory=False)
        self.keys = [make_key(10_000 + i) for i in range(self.CHUNKS)]
        self.blobs = [chunk_blob(k, bytes([i]) * (512 << 10)) for i, k in enumerate(self.keys)]
        self.tier.put(list(zip(self.keys, self.blobs)))
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.misses = self.rounds = 0

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            got = self.tier.get(self.keys)
            self.latencies.append(time.perf_counter() - started)
            self.misses += sum(g is None or bytes(g) != b for g, b in zip(got, self.blobs))
            if self.rounds % 4 == 0:
                key = make_key(50_000 + self.rounds)
                blob = chunk_blob(key, os.urandom(64 << 10))
                self.tier.put([(key, blob)])
                fresh = self.tier.get([key])[0]
                self.misses += fresh is None or bytes(fresh) != blob
            self.rounds += 1
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        self.tier.close()
        ordered = sorted(self.latencies)
        p99 = ordered[int(0.99 * (len(ordered) - 1))]
        assert self.rounds >= 20, self.rounds
        assert self.misses == 0 and self.tier.stats().errors == 0, (self.misses, self.tier.stats())
        assert p99 < 1.0 and max(ordered) < 2.0, f"good client stalled: p99 {p99:.3f}s, max {max(ordered):.3f}s"


def server_stats(proc: ServerProcess) -> dict[str, object]:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{proc.admin_port}/stats", timeout=5).read())


def run_attack(seconds: float, attack: threading.Thread | list[threading.Thread]) -> None:
    threads = attack if isinstance(attack, list) else [attack]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)


def test_slowloris_headers_are_cut_at_the_frame_deadline(server: ServerProcess) -> None:
    good = GoodClient(server.url)
    good.start()
    cut: list[bool] = []

    def slowloris() -> None:  # 30 connections, one header byte every 0.4 s: inside every per-read timeout
        socks = []
        for _ in range(30):
            try:
                socks.append(attacker_socket(server.port))
            except OSError:
                pass
        frame = request(Op.PING, 1)
        open_ = set(range(len(socks)))
        for i in range(10):  # 4 s of dripping; the 32-byte header never completes
            for n in list(open_):
                try:
                    socks[n].send(frame[i : i + 1])
                    if closed_by_server(socks[n], within=0.001):
                        open_.discard(n)
                except OSError:
                    open_.discard(n)
            time.sleep(0.4)
        cut.extend(n not in open_ for n in range(len(socks)))
        for sock in socks:
            sock.close()

    run_attack(5, threading.Thread(target=slowloris))
    good.finish()
    assert cut and all(cut), f"{cut.count(False)} of {len(cut)} slowloris connections still open after 4 s"


def test_slow_put_bodies_cannot_pin_the_pool(server: ServerProcess) -> None:
    good = GoodClient(server.url)
    good.start()
    stop = time.monotonic() + 3.0

    def slow_put(seed: int) -> None:  # announce 8 MiB of chunks, then send a byte every 0.3 s
        keys = [make_key(seed * 100 + i) for i in range(8)]
        while time.monotonic() < stop:
            try:
                sock = attacker_socket(server.port)
                meta = pack_keyed_meta(b"attack", keys, [1 << 20] * 8)
                sock.sendall(Frame(Op.PUT, 1, 8, len(meta), 8 << 20).pack() + meta + b"\0")
                while time.monotonic() < stop:
                    sock.send(b"\0")
                    time.sleep(0.3)
            except OSError:
                time.sleep(0.05)  # cut or refused: come back
            finally:
                sock.close()

    run_attack(5, [threading.Thread(target=slow_put, args=(i,)) for i in range(60)])
    good.finish()
    stats = server_stats(server)
    assert stats["pool"]["free_pages"] + stats["memory"]["chunks"] == stats["pool"]["pages"]  # nothing leaked


def test_readers_that_never_read_only_hurt_themselves(tmp_path: Path) -> None:
    server = start_server(tmp_path, server_io_timeout=2.0)
    try:
        good = GoodClient(server.url)
        good.start()
        stop = time.monotonic() + 3.0

        def non_reader() -> None:  # 4 GETs of 8 of the good client's chunks each, never reading a reply
            while time.monotonic() < stop:
                try:
                    sock = attacker_socket(server.port, rcvbuf=4096)
                    sock.sendall(b"".join(request(Op.GET, i, b"good", good.keys[:8]) for i in range(4)))
                    while time.monotonic() < stop:
                        sock.send(request(Op.PING, 9))  # stays active, never reads
                        time.sleep(0.2)
                except OSError:
                    time.sleep(0.05)
                finally:
                    sock.close()

        run_attack(5, [threading.Thread(target=non_reader) for _ in range(12)])
        good.finish()
    finally:
        server.kill()


def test_idle_connections_are_closed_and_cannot_exhaust_the_server(tmp_path: Path) -> None:
    server = start_server(tmp_path, server_max_connections=16)
    try:
        idle = []
        for _ in range(40):  # more than the whole server's connection limit, from one address
            try:
                idle.append(attacker_socket(server.port))
            except OSError:
                pass
        good = GoodClient(server.url)  # connects after them
        good.start()
        time.sleep(2.5)  # past the idle timeout
        good.finish()
        assert all(closed_by_server(s, within=2.0) for s in idle), "idle connections were never closed"
        for sock in idle:
            sock.close()
        assert server_stats(server)["server"]["refused"] >= 40 - 8
    finally:
        server.kill()


def test_ping_does_not_extend_the_auth_deadline(tmp_path: Path) -> None:
    server = start_server(tmp_path, auth_token=TOKEN)
    try:
        good = GoodClient(server.url, token=TOKEN)
        good.start()
        sock = attacker_socket(server.port)
        started = time.monotonic()
        alive = True
        while alive and time.monotonic() - started < 4.0:
            try:
                sock.sendall(request(Op.PING, 1))
                header = sock.recv(HEADER_SIZE)
                alive = bool(header)
            except OSError:
                alive = False
            time.sleep(0.3)
        sock.close()
        good.finish()
        assert not alive, "an unauthenticated connection kept itself open with PING"
        assert time.monotonic() - started < 3.0
    finally:
        server.kill()


def test_a_put_never_waits_on_a_stalled_disk_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nencache.server.server import BackgroundServer
    from nencache.tiers.disk.tier import DiskTier
    from tests.server.conftest import small_settings

    gate = threading.Event()
    real_put = DiskTier.put
    monkeypatch.setattr(DiskTier, "put", lambda self, items: (gate.wait(60), real_put(self, items))[1])
    with BackgroundServer(small_settings(disk_path=str(tmp_path / "disk"), disk_bytes=256 << 20)) as srv:
        tier = ServerTier(srv.url, "ab" * 16, timeout=2.0)
        items = [(make_key(i), chunk_blob(make_key(i), os.urandom(256 << 10))) for i in range(200)]
        started = time.perf_counter()
        for i in range(0, 200, 10):
            tier.put(items[i : i + 10])  # three pools' worth while the disk writes nothing
        elapsed = time.perf_counter() - started
        assert tier.stats().errors == 0 and tier.stats().stored_chunks == 200, tier.stats()
        assert elapsed < 10.0
        assert all(g is not None for g in tier.get([k for k, _ in items[-40:]]))  # the newest are in memory
        store = srv.server.store  # type: ignore[union-attr]
        writer = store.stats()["disk_writer"]
        assert writer["dropped"] > 0 and writer["dropped"] + writer["pending"] + writer["written"] == 200
        gate.set()
        store.flush()
        writer = store.stats()["disk_writer"]
        assert writer["pending"] == 0 and writer["written"] + writer["dropped"] == 200
        tier.close()


def test_namespaces_differing_only_in_case_never_share_chunks(tmp_path: Path) -> None:
    from nencache.server.server import BackgroundServer
    from tests.server.conftest import small_settings
    from tests.server.util import raw_connect, read_frame

    key = make_key(1)
    upper, lower = chunk_blob(key, b"U" * 1000), chunk_blob(key, b"l" * 2000)
    with BackgroundServer(small_settings(disk_path=str(tmp_path / "disk"), disk_bytes=64 << 20)) as srv:
        with raw_connect(srv.port) as sock:
            sock.sendall(request(Op.PUT, 1, b"ABCDEF", [key], [upper]))
            assert read_frame(sock)[0].count == 1  # type: ignore[index]
            srv.server.store.flush()  # type: ignore[union-attr]  # on disk now
            sock.sendall(request(Op.GET, 2, b"abcdef", [key]))
            frame, meta, body = read_frame(sock)  # type: ignore[misc]
            assert struct.unpack("<Q", meta) == (0,) and body == b"", "abcdef served a chunk stored under ABCDEF"
            sock.sendall(request(Op.PUT, 3, b"abcdef", [key], [lower]))
            assert read_frame(sock)[0].count == 1  # type: ignore[index]
            srv.server.store.flush()  # type: ignore[union-attr]
            srv.server.store.memory.clear()  # type: ignore[union-attr]  # both now come from disk
            for rid, namespace, blob in ((4, b"ABCDEF", upper), (5, b"abcdef", lower)):
                sock.sendall(request(Op.GET, rid, namespace, [key]))
                assert read_frame(sock)[2] == blob  # type: ignore[index]


def test_a_slow_disk_is_answered_from_memory_and_read_in_the_background(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nencache.server.server import BackgroundServer
    from nencache.tiers.disk.tier import DiskTier
    from tests.server.conftest import small_settings

    real_get = DiskTier.get
    with BackgroundServer(small_settings(disk_path=str(tmp_path / "disk"), disk_bytes=64 << 20)) as srv:
        tier = ServerTier(srv.url, "ab" * 16, timeout=1.0, shared_memory=False)
        key = make_key(1)
        blob = chunk_blob(key, os.urandom(100_000))
        tier.put([(key, blob)])
        store = srv.server.store  # type: ignore[union-attr]
        store.flush()
        store.memory.clear()  # on disk only now
        monkeypatch.setattr(DiskTier, "get", lambda self, keys: (time.sleep(1.5), real_get(self, keys))[1])
        started = time.perf_counter()
        assert tier.get([key]) == [None]  # the disk is slow: a miss now, well inside the client's timeout
        assert time.perf_counter() - started < 0.9 and tier.stats().errors == 0 and tier.is_up
        deadline = time.monotonic() + 10
        while key not in {k[-16:] for k in list(store.memory._index)} and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.05)
        got = tier.get([key])[0]  # the read went on and promoted it
        assert got is not None and bytes(got) == blob
        assert srv.server.counters.disk_reads_skipped >= 1  # type: ignore[union-attr]
        tier.close()
