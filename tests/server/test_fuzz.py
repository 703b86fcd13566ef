"""Hostile input: >= 10,000 malformed frames while a well-behaved client is served correctly throughout.

Raw random bytes, mutated valid frames (flipped bytes, truncations, extreme lengths and counts),
hypothesis-built frames, and wrong tokens, each on its own connection, from several threads. The
server (a child process) must answer or close every one, never hang, and stay up.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nencache.net.protocol import HEADER_SIZE, MAGIC, VERSION, Frame, Op, pack_keyed_meta
from nencache.tiers.remote import ServerTier
from tests.server.util import ServerProcess, chunk_blob, request
from tests.tiers.contract import make_key

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token"
RAW_FRAMES = int(os.environ.get("NENCACHE_FUZZ_FRAMES", "8000"))
HYPOTHESIS_FRAMES = 2500
EXTREMES = [0, 1, 2, 15, 16, 17, 255, 256, 1023, 1024, 1025, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
EXTREMES_64 = EXTREMES + [2**32, 2**40, 2**63, 2**64 - 1]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("fuzz")
    proc = ServerProcess(directory, {"cpu_size": "64MiB", "server_max_chunk_bytes": "256KiB",
                                     "server_max_request_bytes": "1MiB", "server_max_keys": 64,
                                     "server_io_timeout": 2.0, "auth_token": TOKEN})
    proc.start()
    yield proc
    proc.kill()


def auth(token: str = TOKEN) -> bytes:
    return request(Op.AUTH, 1, meta=token.encode())


def deliver(port: int, data: bytes) -> None:
    """Send `data` on a fresh connection, close our side, read until the server closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 16):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server closed while we were still sending: a fine answer to garbage


def valid_frames(rng: random.Random) -> list[bytes]:
    keys = [make_key(rng.randrange(1 << 30)) for _ in range(rng.randrange(1, 4))]
    blobs = [chunk_blob(k, rng.randbytes(rng.randrange(1, 3000))) for k in keys]
    return [request(Op.PUT, 2, b"fz", keys, blobs), request(Op.GET, 3, b"fz", keys), request(Op.EXISTS, 4, b"fz", keys),
            request(Op.DELETE, 5, b"fz", keys), request(Op.CLEAR, 6, b"fz"), request(Op.PING, 7),
            request(Op.STATS, 8)]


def mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    kind = rng.randrange(6)
    if kind == 0:  # flip bytes anywhere
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del data[rng.randrange(len(data)) :]
    elif kind == 2:  # an extreme count or length field
        offset, fmt = rng.choice([(12, "<I"), (16, "<I"), (24, "<Q"), (8, "<I"), (5, "<B"), (6, "<H")])
        value = rng.choice(EXTREMES_64 if fmt == "<Q" else EXTREMES) % (1 << (8 * struct.calcsize(fmt)))
        struct.pack_into(fmt, data, offset, value)
    elif kind == 3:  # extra garbage after the frame
        data += rng.randbytes(rng.randrange(1, 200))
    elif kind == 4 and len(data) > HEADER_SIZE + 1:  # damage the meta section (namespace length, keys, lengths)
        data[HEADER_SIZE + rng.randrange(len(data) - HEADER_SIZE)] = rng.randrange(256)
    else:  # a hostile namespace length
        if len(data) > HEADER_SIZE:
            data[HEADER_SIZE] = rng.choice([0, 1, 200, 255])
    return bytes(data)


def keyed_frame(op: Op, namespace: bytes, nkeys: int, lengths: list[int], body: bytes) -> bytes:
    """A keyed request whose header agrees with its meta, carrying hostile namespaces, lengths and bodies."""
    meta = pack_keyed_meta(namespace, [make_key(i) for i in range(nkeys)], lengths if op == Op.PUT else None)
    body_len = sum(lengths) % 2**64 if op == Op.PUT and len(body) % 2 else len(body)
    return Frame(op, 9, nkeys, len(meta), body_len).pack() + meta + body


def raw_case(rng: random.Random) -> bytes:
    choice = rng.random()
    if choice < 0.15:
        return rng.randbytes(rng.randrange(0, 300))
    if choice < 0.25:
        return struct.pack("<4sB", MAGIC, VERSION) + rng.randbytes(rng.randrange(0, 300))
    if choice < 0.32:
        return auth(rng.choice(["", "fuzz", "fuzz-token-x", "FUZZ-TOKEN", rng.randbytes(8).hex()]))
    frame = mutate(rng.choice(valid_frames(rng)), rng)
    return (auth() if rng.random() < 0.85 else b"") + frame


class GoodClient(threading.Thread):
    """Puts, gets back and checks chunks the whole time; any wrong answer or error fails the test."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.tier = ServerTier(url, "good-client", timeout=10.0, auth_token=TOKEN)
        self.stop = threading.Event()
        self.rounds = 0
        self.failures: list[str] = []

    def run(self) -> None:
        rng = random.Random(1)
        while not self.stop.is_set():
            keys = [make_key(rng.randrange(1 << 40)) for _ in range(4)]
            blobs = [chunk_blob(k, rng.randbytes(rng.randrange(100, 200_000))) for k in keys]
            self.tier.put(list(zip(keys, blobs)))
            got = self.tier.get(keys)
            if [bytes(g) if g is not None else None for g in got] != blobs:
                self.failures.append(f"round {self.rounds}: wrong or missing chunks")
            if self.tier.contains_prefix(keys) != 4:
                self.failures.append(f"round {self.rounds}: exists disagrees")
            self.tier.delete(keys[:1])
            self.rounds += 1
            time.sleep(0.002)


def test_hostile_frames_never_disturb_a_good_client(fuzz_server: ServerProcess) -> None:
    good = GoodClient(fuzz_server.url)
    assert good.tier.is_up
    good.start()
    sent = 0
    started = time.monotonic()

    def fuzz_worker(seed: int, count: int) -> None:
        rng = random.Random(seed)
        for _ in range(count):
            deliver(fuzz_server.port, raw_case(rng))

    workers = [threading.Thread(target=fuzz_worker, args=(seed, RAW_FRAMES // 4)) for seed in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    sent += 4 * (RAW_FRAMES // 4)

    frames = st.builds(
        lambda op, flags, rid, count, meta_len, status, body_len, meta, body: Frame(
            op, rid, count, meta_len, body_len, flags, status).pack() + meta + body,
        st.sampled_from([*range(0, 10), 255]), st.sampled_from([0, 0, 0, 1, 2, 4, 0xFFFF]),
        st.integers(0, 2**32 - 1), st.sampled_from(EXTREMES) | st.integers(0, 70),
        st.sampled_from(EXTREMES) | st.integers(0, 2000), st.sampled_from([0, 0, 1]),
        st.sampled_from(EXTREMES_64) | st.integers(0, 5000), st.binary(max_size=300), st.binary(max_size=300))
    structured = st.builds(
        keyed_frame,
        st.sampled_from([Op.PUT, Op.GET, Op.EXISTS, Op.DELETE, Op.CLEAR]), st.binary(min_size=0, max_size=255),
        st.integers(0, 70), st.lists(st.sampled_from(EXTREMES_64) | st.integers(0, 4096), max_size=70),
        st.binary(max_size=400))
    hypothesis_sent = [0]

    @settings(max_examples=HYPOTHESIS_FRAMES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(frames, structured), st.booleans())
    def hostile(frame: bytes, authed: bool) -> None:
        try:
            deliver(fuzz_server.port, (auth() if authed else b"") + frame)
        except struct.error:
            return
        hypothesis_sent[0] += 1

    hostile()
    sent += hypothesis_sent[0]
    good.stop.set()
    good.join(30)
    elapsed = time.monotonic() - started

    assert sent >= 10_000, sent
    assert fuzz_server.proc is not None and fuzz_server.proc.poll() is None, "the server died"
    assert not good.failures, good.failures[:5]
    assert good.rounds >= 20 and good.tier.stats().errors == 0 and good.tier.is_up
    stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{fuzz_server.admin_port}/stats", timeout=5).read())
    assert sum(stats["server"]["errors"].values()) > sent // 2
    assert stats["server"]["connections"] <= 2  # every hostile connection was closed
    assert stats["pool"]["free_pages"] + stats["memory"]["chunks"] == stats["pool"]["pages"]  # no leaked page
    print(f"{sent} hostile frames in {elapsed:.1f}s; good client: {good.rounds} clean rounds")
    good.tier.close()
