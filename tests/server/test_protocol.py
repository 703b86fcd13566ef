"""Wire protocol and security: header checks, limits, error frames, auth, non-loopback refusal."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nencache.errors import ConfigError
from nencache.net.protocol import (
    HEADER_SIZE, MAGIC, Code, Flag, Frame, Limits, Op, ProtocolError, check_request, pack_keyed_meta,
    parse_keyed_meta,
)
from nencache.server.server import BackgroundServer
from nencache.server.settings import ServerSettings, is_loopback
from nencache.tiers.remote import ServerTier
from tests.server.conftest import small_settings
from tests.server.util import chunk_blob, raw_connect, read_frame, request
from tests.tiers.contract import make_blob, make_key

LIMITS = Limits(max_chunk_bytes=1 << 20, max_request_bytes=8 << 20, max_keys=64)


def expect_error(sock: socket.socket, code: Code, *, closing: bool = True) -> str:
    reply = read_frame(sock)
    assert reply is not None, "the server closed without an error frame"
    frame, _, body = reply
    assert frame.flags & Flag.ERROR and frame.status == code, (frame, body)
    assert bool(frame.flags & Flag.CLOSING) == closing
    if closing:
        sock.settimeout(5)
        try:
            assert sock.recv(1) == b"", "the server kept the connection open after a fatal error"
        except ConnectionResetError:
            pass  # closed with our unread bytes still queued: also a close
    return body.decode()


@pytest.mark.parametrize(("frame", "code"), [
    (Frame(99, 1), Code.UNSUPPORTED),
    (Frame(Op.PING, 1, flags=1), Code.BAD_FRAME),
    (Frame(Op.GET, 1, count=9, meta_len=1 + 2 + 9 * 16), Code.TOO_LARGE),  # more keys than one GET takes
    (Frame(Op.PUT, 1, count=65, meta_len=4000), Code.TOO_LARGE),
    (Frame(Op.PUT, 1, count=1, meta_len=1 + 2 + 24, body_len=(8 << 20) + 1), Code.TOO_LARGE),
    (Frame(Op.EXISTS, 1, count=1, meta_len=1 + 2 + 16, body_len=5), Code.BAD_FRAME),
    (Frame(Op.PING, 1, meta_len=3), Code.BAD_FRAME),
    (Frame(Op.AUTH, 1, meta_len=5000), Code.TOO_LARGE),
    (Frame(Op.EXISTS, 1, count=2, meta_len=1 + 255 + 2 * 16 + 1), Code.BAD_FRAME),
])
def test_check_request_rejects(frame: Frame, code: Code) -> None:
    with pytest.raises(ProtocolError) as info:
        check_request(frame, LIMITS)
    assert info.value.code == code and info.value.fatal


def test_keyed_meta_roundtrip_and_checks() -> None:
    keys = [make_key(i) for i in range(3)]
    meta = pack_keyed_meta(b"ns-1", keys, [64, 100, 1 << 20])
    assert parse_keyed_meta(Op.PUT, 3, memoryview(meta), LIMITS) == (b"ns-1", keys, [64, 100, 1 << 20])
    for lengths in ([63, 100, 100], [64, 100, (1 << 20) + 1]):
        bad = pack_keyed_meta(b"ns-1", keys, lengths)
        with pytest.raises(ProtocolError):
            parse_keyed_meta(Op.PUT, 3, memoryview(bad), LIMITS)
    with pytest.raises(ProtocolError):
        parse_keyed_meta(Op.GET, 3, memoryview(pack_keyed_meta(b"bad ns!", keys)), LIMITS)
    with pytest.raises(ProtocolError):
        parse_keyed_meta(Op.GET, 2, memoryview(pack_keyed_meta(b"ns", keys)), LIMITS)


def test_malformed_frames_get_an_error_and_a_close(local_server: BackgroundServer) -> None:
    cases = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(8), Code.BAD_FRAME),
        (struct.pack("<4sB", MAGIC, 7) + bytes(HEADER_SIZE - 5), Code.UNSUPPORTED),
        (Frame(Op.GET, 5, count=1, meta_len=1 + 2 + 16).pack() + b"\x02n!" + bytes(16), Code.BAD_FRAME),
        (Frame(Op.PUT, 6, count=1, meta_len=1 + 2 + 24, body_len=100).pack()
         + pack_keyed_meta(b"ns", [make_key(1)], [64]), Code.BAD_FRAME),  # lengths do not add up to the body
        (Frame(Op.GET, 7, count=1, meta_len=(1 << 31)).pack(), Code.BAD_FRAME),
    ]
    for data, code in cases:
        with raw_connect(local_server.port) as sock:
            sock.sendall(data)
            expect_error(sock, code)
    with raw_connect(local_server.port) as sock:  # the server still answers
        sock.sendall(request(Op.PING, 9))
        frame, _, _ = read_frame(sock)  # type: ignore[misc]
        assert frame.request_id == 9 and not frame.is_error


def test_a_bad_chunk_is_refused_but_the_connection_stays(local_server: BackgroundServer) -> None:
    with raw_connect(local_server.port) as sock:
        key = make_key(3)
        sock.sendall(request(Op.PUT, 1, b"bad-chunk", [key], [b"x" * 100]))
        expect_error(sock, Code.BAD_CHUNK, closing=False)
        sock.sendall(request(Op.PUT, 2, b"bad-chunk", [key], [chunk_blob(key, b"y" * 100)]))
        frame, _, _ = read_frame(sock)  # type: ignore[misc]
        assert frame.request_id == 2 and frame.count == 1


def test_pipelined_requests_are_answered_by_id(local_server: BackgroundServer) -> None:
    keys = [make_key(i) for i in range(4)]
    blobs = [chunk_blob(k, bytes([i]) * 5000) for i, k in enumerate(keys)]
    with raw_connect(local_server.port) as sock:
        sock.sendall(b"".join([request(Op.PUT, 10, b"pipe", keys, blobs), request(Op.EXISTS, 11, b"pipe", keys),
                               request(Op.GET, 12, b"pipe", keys[:2]), request(Op.PING, 13)]))
        replies = {}
        for _ in range(4):
            frame, meta, body = read_frame(sock)  # type: ignore[misc]
            replies[frame.request_id] = (frame, meta, body)
        assert replies[10][0].count == 4 and replies[11][0].count == 4
        assert replies[12][2] == blobs[0] + blobs[1]
        assert struct.unpack("<2Q", replies[12][1]) == (len(blobs[0]), len(blobs[1]))


def test_token_required_and_compared(tmp_path: Path) -> None:
    with BackgroundServer(small_settings(auth_token="s3cret")) as server:
        with raw_connect(server.port) as sock:  # a data op before AUTH
            sock.sendall(request(Op.EXISTS, 1, b"ns", [make_key(1)]))
            assert "auth token" in expect_error(sock, Code.AUTH_REQUIRED)
        with raw_connect(server.port) as sock:
            sock.sendall(request(Op.AUTH, 2, meta=b"wrong"))
            expect_error(sock, Code.AUTH_FAILED)
        wrong = ServerTier(server.url, "ns", timeout=1.0, auth_token="nope")
        assert not wrong.is_up and wrong.get([make_key(1)]) == [None] and wrong.contains_prefix([make_key(1)]) == 0
        wrong.put([(make_key(1), make_blob(make_key(1)))])  # no exception
        wrong.close()
        right = ServerTier(server.url, "ns", timeout=5.0, auth_token="s3cret")
        right.put([(make_key(1), make_blob(make_key(1)))])
        assert right.contains_prefix([make_key(1)]) == 1
        right.close()


def test_non_loopback_needs_a_token() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(ConfigError, match="auth token"):
        ServerSettings(host="0.0.0.0")
    with BackgroundServer(small_settings(host="0.0.0.0", auth_token="t0ken")) as server:
        with raw_connect(server.port) as sock:
            sock.sendall(request(Op.GET, 1, b"ns", [make_key(1)]))
            expect_error(sock, Code.AUTH_REQUIRED)
        tier = ServerTier(f"nencache://127.0.0.1:{server.port}", "ns", timeout=5.0, auth_token="t0ken")
        assert tier.is_up and tier.get([make_key(1)]) == [None]
        tier.close()


def test_cli_refuses_non_loopback_without_token(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "nencache.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                           "--admin-port", "-1"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "auth token" in done.stderr


def test_connection_limit(tmp_path: Path) -> None:
    with BackgroundServer(small_settings(max_connections=2)) as server:
        first, second = raw_connect(server.port), raw_connect(server.port)
        try:
            for sock in (first, second):
                sock.sendall(request(Op.PING, 1))
                assert read_frame(sock) is not None
            with raw_connect(server.port) as third:
                expect_error(third, Code.BUSY)
        finally:
            first.close()
            second.close()


def test_namespace_isolation_on_the_wire(local_server: BackgroundServer) -> None:
    a, b = uuid.uuid4().hex.encode(), uuid.uuid4().hex.encode()
    key = make_key(5)
    with raw_connect(local_server.port) as sock:
        sock.sendall(request(Op.PUT, 1, a, [key], [chunk_blob(key, b"a" * 10)]))
        assert read_frame(sock)[0].count == 1  # type: ignore[index]
        sock.sendall(request(Op.EXISTS, 2, b, [key]))
        assert read_frame(sock)[0].count == 0  # type: ignore[index]


def test_a_slow_server_is_not_taken_for_a_dead_one() -> None:
    """A call that times out is a miss; only several in a row mark the server down (a refused one does at once)."""
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog) and never answers
    try:
        tier = ServerTier(f"nencache://127.0.0.1:{listener.getsockname()[1]}", "ns", timeout=0.2,
                          shared_memory=False)
        assert tier.is_up  # the first call (its AUTH) timed out: counted, but not taken for down
        assert tier.get([make_key(1)]) == [None] and tier.is_up
        assert tier.get([make_key(1)]) == [None] and not tier.is_up  # three in a row
        assert tier.stats().errors == 3
        tier.close()
    finally:
        listener.close()


def test_a_large_get_pipelined_before_a_put_body_never_stalls_the_reader(tmp_path: Path) -> None:
    """Small memory-only reads are answered in the reader loop itself; a GET whose reply could fill the socket
    buffers is not, so a client that pipelines a large PUT body behind it before reading any reply is still
    read: both replies come back."""
    import threading

    settings = small_settings(max_chunk_bytes=2 << 20, max_request_bytes=32 << 20, pool_bytes=80 << 20)
    keys = [make_key(i) for i in range(12)]
    blobs = [chunk_blob(key, bytes([i]) * ((2 << 20) - 64)) for i, key in enumerate(keys)]
    with BackgroundServer(settings) as server:
        tier = ServerTier(server.url, "ns", timeout=5.0, shared_memory=False)
        tier.put(list(zip(keys, blobs)))
        tier.close()
        sock = raw_connect(server.port, timeout=10.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # replies wait in the server's buffers
        put_keys = [make_key(100 + i) for i in range(12)]
        put_blobs = [chunk_blob(key, b"p" * ((2 << 20) - 64)) for key in put_keys]
        frames = request(Op.GET, 1, keys=keys) + request(Op.PUT, 2, keys=put_keys, blobs=put_blobs)
        sender = threading.Thread(target=sock.sendall, args=(frames,), daemon=True)
        sender.start()
        sender.join(timeout=8.0)
        assert not sender.is_alive(), "the server stopped reading while its GET reply waited for the client"
        replies = {}
        for _ in range(2):
            reply = read_frame(sock)
            assert reply is not None
            replies[reply[0].request_id] = reply
        assert replies[1][0].count == 12 and len(replies[1][2]) == sum(len(b) for b in blobs)
        put_reply = replies[2][0]
        assert put_reply.count == 12 or (put_reply.flags & Flag.ERROR and put_reply.status == Code.BUSY)
        sock.close()
