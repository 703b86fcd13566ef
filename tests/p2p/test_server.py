"""The peer endpoint's server (`PeerServer`): the protocol's answers, its deadlines and limits, and its stop.

Each test runs a `PeerServer` in this process over a real memory tier holding a few chunks. Attackers
connect from 127.0.0.2 (another client address); the good client is the real peer client
(`PeerClients`), reading and checking chunks the whole time: it must see no miss, no failure and no stall.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nencache.net.protocol import HEADER_SIZE, MISSING, Code, Flag, Frame, Op, unpack_lengths
from nencache.p2p.endpoint import PeerStore
from nencache.p2p.server import PageBudget, PeerConnection, PeerServer
from nencache.pool import MemoryPool
from nencache.server.settings import ServerSettings
from nencache.tiers.memory import MemoryTier
from nencache.tiers.peer.client import PeerClients, peer_address
from tests.p2p.util import CHUNK, LAYOUT, compute_kv
from tests.server.util import attacker_socket, raw_connect, read_frame, request
from tests.tiers.contract import make_key

NAMESPACE = b"peer-test"
TOKEN = "peer-token"
BIG = 256  # tokens of the large chunks a non-reader asks for (a 256 KiB reply each)


@dataclass
class Endpoint:
    server: PeerServer
    memory: MemoryTier
    keys: list[bytes]  # small chunks, held
    big: list[bytes]  # large chunks, held

    @property
    def address(self) -> str:
        return peer_address("127.0.0.1", self.server.port)

    def pinned_pages(self) -> int:
        return sum(self.memory.pool.refcount(page) > 1 for page in range(self.memory.pool.num_pages))


def start(token: str | None = None, **changes: object) -> Endpoint:
    page = LAYOUT.nbytes(BIG) + 64
    memory = MemoryTier(MemoryPool(64 * page, page, pin_memory=False), LAYOUT)
    keys = [make_key(i) for i in range(8)]
    big = [make_key(100 + i) for i in range(8)]
    for i, key in enumerate(keys):
        memory.put_tensor(key, compute_kv(list(range(i, i + CHUNK))))
    for i, key in enumerate(big):
        memory.put_tensor(key, compute_kv(list(range(i, i + BIG))))
    base: dict[str, object] = dict(host="127.0.0.1", port=0, admin_port=None, auth_token=token, pool_bytes=64 * page,
                                   max_chunk_bytes=page, max_request_bytes=8 * page, io_timeout=1.0, idle_timeout=2.0,
                                   auth_timeout=1.0, max_connections=32, max_client_connections=8)
    settings = ServerSettings(**(base | changes))  # type: ignore[arg-type]
    return Endpoint(PeerServer(settings, PeerStore(memory, NAMESPACE)).start(), memory, keys, big)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    served = start()
    yield served
    served.server.stop()


class GoodPeer(threading.Thread):
    """Fetches the endpoint's small chunks over and over through `PeerClients`, checking each."""

    def __init__(self, endpoint: Endpoint, token: str | None = None) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.failures = 0
        self.clients = PeerClients(NAMESPACE, timeout=3.0, auth_token=token, shared_memory=False,
                                   on_failure=self._failed)
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.misses = 0

    def _failed(self) -> None:
        self.failures += 1

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            got = self.clients.get(self.endpoint.address, self.endpoint.keys)
            self.latencies.append(time.perf_counter() - started)
            self.misses += sum(blob is None for blob in got)
            time.sleep(0.005)

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        self.clients.close()
        ordered = sorted(self.latencies)
        assert len(ordered) >= 20, len(ordered)
        assert self.misses == 0 and self.failures == 0, (self.misses, self.failures)
        assert ordered[int(0.99 * (len(ordered) - 1))] < 0.5 and ordered[-1] < 1.5, ordered[-5:]


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (whatever it sends first is read and dropped)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(1 << 16):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def error_of(sock: socket.socket) -> tuple[int, bool]:
    """The code of the error frame the server sends next, and whether it says it closes the connection."""
    reply = read_frame(sock)
    assert reply is not None
    frame, _, _ = reply
    assert frame.flags & Flag.ERROR, frame
    return frame.status, bool(frame.flags & Flag.CLOSING)


def test_reads_are_answered_from_the_pool_and_writes_refused(endpoint: Endpoint) -> None:
    clients = PeerClients(NAMESPACE, timeout=2.0, shared_memory=False)
    try:
        blobs = clients.get(endpoint.address, [*endpoint.keys, make_key(999)])
        assert all(blob is not None for blob in blobs[:-1]) and blobs[-1] is None  # checked: key and CRC
        assert clients.exists(endpoint.address, [*endpoint.keys[:3], make_key(999), endpoint.keys[3]]) == 3
    finally:
        clients.close()
    with raw_connect(endpoint.server.port) as sock:
        sock.sendall(request(Op.GET, 1, b"another-namespace", endpoint.keys[:2]) + request(Op.DELETE, 2, NAMESPACE,
                     endpoint.keys) + request(Op.CLEAR, 3, NAMESPACE) + request(Op.STATS, 4) + request(Op.PING, 5))
        replies = [read_frame(sock) for _ in range(5)]
        assert [r[0].request_id for r in replies if r is not None] == [1, 2, 3, 4, 5]  # in order
        get = replies[0]
        assert get is not None and unpack_lengths(get[1], 2) == (MISSING, MISSING) and not get[2]
        stats = replies[3]
        assert stats is not None and json.loads(stats[2])["served_chunks"] == len(endpoint.keys)
        assert all(key in endpoint.memory for key in endpoint.keys)  # DELETE and CLEAR are ignored
        sock.sendall(request(Op.PUT, 6, NAMESPACE, [make_key(500)], [b"x" * 100]))
        assert error_of(sock) == (Code.UNSUPPORTED, True)
        assert closed_within(sock, 2.0)
    assert make_key(500) not in endpoint.memory
    assert endpoint.pinned_pages() == 0


def test_requests_split_into_single_bytes_or_sent_together_are_answered(endpoint: Endpoint) -> None:
    frames = [request(Op.GET, i, NAMESPACE, endpoint.keys[i % 7 : i % 7 + 2]) for i in range(1, 600)]
    assert sum(map(len, frames)) > 40_000  # more than the server's inbox: it refills across frames
    with raw_connect(endpoint.server.port) as sock:
        sock.sendall(b"".join(frames))
        for i in range(1, 600):
            reply = read_frame(sock)
            assert reply is not None and reply[0].request_id == i and reply[0].count == 2
            lengths = unpack_lengths(reply[1], 2)
            assert MISSING not in lengths and len(reply[2]) == sum(lengths)
        for byte in frames[0]:  # a frame that trickles in within the deadline
            sock.send(bytes([byte]))
        reply = read_frame(sock)
        assert reply is not None and reply[0].request_id == 1


def test_a_reply_of_more_parts_than_one_sendmsg_takes_arrives_whole() -> None:
    served = start(max_request_bytes=1024 * LAYOUT.nbytes(BIG))  # GETs of up to 1024 keys
    try:
        asked = [served.keys[i % len(served.keys)] for i in range(600)]  # 600 blobs: past the 512 parts of a sendmsg
        clients = PeerClients(NAMESPACE, timeout=5.0, shared_memory=False)
        try:
            blobs = clients.get(served.address, asked)  # each checked: header, key and payload CRC
        finally:
            clients.close()
        assert all(blob is not None for blob in blobs)
        assert served.server.stats()["server"]["requests"]["get"] == 1  # one request, one reply
        assert served.pinned_pages() == 0
    finally:
        served.server.stop()


def test_slow_idle_and_non_reading_connections_are_cut_while_a_peer_is_served(endpoint: Endpoint) -> None:
    good = GoodPeer(endpoint)
    good.start()
    slow = attacker_socket(endpoint.server.port)
    header = request(Op.PING, 1)
    started = time.monotonic()
    cut_slow = False
    for byte in header[:8]:  # one byte each 0.3 s: the header is not whole within io_timeout (1 s)
        try:
            slow.send(bytes([byte]))
        except OSError:
            cut_slow = True
            break
        if closed_within(slow, 0.3):
            cut_slow = True
            break
    assert cut_slow and time.monotonic() - started < 2.0
    idle = attacker_socket(endpoint.server.port)
    non_readers = []
    for _ in range(3):  # 32 MiB of replies (more than the socket buffers), never read: cut at io_timeout
        sock = attacker_socket(endpoint.server.port, rcvbuf=4096)
        sock.sendall(b"".join(request(Op.GET, i, NAMESPACE, endpoint.big) for i in range(32)))
        non_readers.append(sock)
    deadline = time.monotonic() + 3.0  # the attackers read nothing meanwhile: only the good peer's connection stays
    while endpoint.server.stats()["server"]["connections"] > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert endpoint.server.stats()["server"]["connections"] == 1, "a connection not read from, or idle, was kept"
    assert all(closed_within(sock, 3.0) for sock in (idle, *non_readers))
    good.finish()
    for sock in (slow, idle, *non_readers):
        sock.close()
    assert endpoint.pinned_pages() == 0 and endpoint.server.replies.free == endpoint.server.replies.total


def test_a_token_is_required_before_anything_but_ping_and_ping_does_not_extend_the_deadline() -> None:
    served = start(token=TOKEN)
    try:
        with raw_connect(served.server.port) as sock:
            sock.sendall(request(Op.GET, 1, NAMESPACE, served.keys[:1]))
            assert error_of(sock) == (Code.AUTH_REQUIRED, True)
        with raw_connect(served.server.port) as sock:
            sock.sendall(request(Op.AUTH, 1, meta=b"not-the-token"))
            assert error_of(sock) == (Code.AUTH_FAILED, True)
        sock = attacker_socket(served.server.port)
        started = time.monotonic()
        alive = True
        while alive and time.monotonic() - started < 3.0:
            try:
                sock.sendall(request(Op.PING, 1))
                alive = read_frame(sock) is not None
            except OSError:
                alive = False
            time.sleep(0.2)
        sock.close()
        assert not alive and time.monotonic() - started < 2.0, "PING kept an unauthenticated connection open"
        good = GoodPeer(served, token=TOKEN)
        good.start()
        time.sleep(0.3)
        good.finish()
        without = PeerClients(NAMESPACE, timeout=2.0, shared_memory=False)
        assert without.get(served.address, served.keys[:1]) == [None]  # a miss, never an exception
        without.close()
    finally:
        served.server.stop()


def test_connections_past_the_limits_are_refused_busy(endpoint: Endpoint) -> None:
    held = [attacker_socket(endpoint.server.port) for _ in range(8)]  # max_client_connections
    time.sleep(0.1)
    extra = attacker_socket(endpoint.server.port)
    assert error_of(extra) == (Code.BUSY, True)
    extra.close()
    good = GoodPeer(endpoint)  # another address is still served
    good.start()
    time.sleep(0.3)
    good.finish()
    for sock in held:
        sock.close()
    assert endpoint.server.stats()["server"]["refused"] == 1


def test_a_full_replies_budget_answers_busy_and_keeps_the_connection(endpoint: Endpoint) -> None:
    budget = endpoint.server.replies
    taken = budget.take(budget.total, 1.0)
    try:
        with raw_connect(endpoint.server.port) as sock:
            sock.sendall(request(Op.GET, 1, NAMESPACE, endpoint.keys[:1]))
            assert error_of(sock) == (Code.BUSY, False)
            sock.sendall(request(Op.PING, 2))
            reply = read_frame(sock)
            assert reply is not None and reply[0].request_id == 2
    finally:
        budget.give(taken)
    assert endpoint.pinned_pages() == 0


def test_malformed_frames_get_an_error_or_a_close_and_never_hang(endpoint: Endpoint) -> None:
    good = GoodPeer(endpoint)
    good.start()
    rng = random.Random(5)
    valid = [request(Op.GET, 1, NAMESPACE, endpoint.keys[:2]), request(Op.EXISTS, 2, NAMESPACE, endpoint.keys),
             request(Op.PING, 3), request(Op.AUTH, 4, meta=b"x"), request(Op.LOCATE, 5, NAMESPACE, endpoint.keys[:1])]
    sent, until = 0, time.monotonic() + 30.0
    while sent < 300 or (len(good.latencies) < 20 and time.monotonic() < until):  # the good peer reads throughout
        sent += 1
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(HEADER_SIZE, len(data) + 1) :]
        with attacker_socket(endpoint.server.port) as sock:
            sock.sendall(bytes(data))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(3.0)
            try:
                while sock.recv(1 << 16):
                    pass
            except ConnectionResetError:
                pass  # a close before everything was read: an answer too; a hang raises TimeoutError
    good.finish()
    deadline = time.monotonic() + 3.0
    while endpoint.server.stats()["server"]["connections"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert endpoint.server.stats()["server"]["connections"] == 0
    assert endpoint.pinned_pages() == 0


def answer(sock: socket.socket) -> tuple[int, int, int, int, int, bytes, bytes] | None:
    """The endpoint's next frame on `sock` (everything in it), or None if it closed the connection instead."""
    try:
        reply = read_frame(sock)
    except ConnectionResetError:
        return None
    if reply is None:
        return None
    frame, meta, body = reply
    return frame.op, frame.flags, frame.status, frame.request_id, frame.count, meta, body


def test_a_get_after_the_first_on_a_connection_is_answered_as_on_a_fresh_one(
        endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    # Once a connection has named a namespace, its GETs of it skip the general path (`_plain_get`); whatever
    # that path takes must get the answer the general path gives, and whatever it leaves must reach it.
    taken = []
    plain_get = PeerConnection._plain_get

    def spy(self: PeerConnection) -> object:
        found = plain_get(self)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(PeerConnection, "_plain_get", spy)
    rng = random.Random(11)
    valid = request(Op.GET, 7, NAMESPACE, endpoint.keys[:3])
    too_many = [endpoint.keys[i % len(endpoint.keys)] for i in range(9)]  # the endpoint takes 8 keys per GET
    cases = [valid, request(Op.GET, 8, NAMESPACE, [make_key(999), endpoint.keys[0]]),
             request(Op.GET, 9, NAMESPACE, too_many), request(Op.GET, 10, NAMESPACE, [])]
    for _ in range(200):
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cases.append(bytes(data))
    outcomes = []
    for case in cases:
        answers = []
        for first in (b"", request(Op.GET, 1, NAMESPACE, endpoint.keys[:1])):
            with raw_connect(endpoint.server.port) as sock:
                sock.sendall(first + case)
                sock.shutdown(socket.SHUT_WR)
                if first:
                    assert answer(sock) is not None
                answers.append(answer(sock))
        assert answers[0] == answers[1], case
        outcomes.append(answers[0])
    held, one_missing = outcomes[0], outcomes[1]
    assert held is not None and MISSING not in unpack_lengths(held[5], 3)
    assert sum(unpack_lengths(held[5], 3)) == len(held[6])
    assert one_missing is not None and unpack_lengths(one_missing[5], 2)[0] == MISSING
    assert sum(taken) >= 2  # at least the two unmutated GETs took the plain path on their second connection
    assert endpoint.pinned_pages() == 0


def test_stop_ends_waiting_connections_at_once_and_stops_listening() -> None:
    served = start(idle_timeout=60.0)
    clients = PeerClients(NAMESPACE, timeout=2.0, shared_memory=False)
    assert None not in clients.get(served.address, served.keys)  # its connection now waits for a next frame
    idle = [raw_connect(served.server.port) for _ in range(5)]
    started = time.monotonic()
    served.server.stop()
    assert time.monotonic() - started < 1.0
    assert all(closed_within(sock, 1.0) for sock in idle)
    with pytest.raises(OSError):
        raw_connect(served.server.port, timeout=1.0)
    assert served.server.stats()["server"]["connections"] == 0
    assert clients.get(served.address, served.keys[:1]) == [None]
    served.server.stop()  # twice is fine
    clients.close()
    for sock in idle:
        sock.close()


def test_the_page_budget_waits_for_pages_and_gives_up_after_its_timeout() -> None:
    budget = PageBudget(4)
    assert budget.take(10, 0.1) == 4  # more than the whole budget: all of it
    started = time.monotonic()
    assert budget.take(1, 0.2) == 0 and time.monotonic() - started >= 0.19
    threading.Timer(0.1, budget.give, args=(4,)).start()
    assert budget.take(3, 2.0) == 3 and budget.free == 1
    budget.give(3)
    assert budget.free == 4
