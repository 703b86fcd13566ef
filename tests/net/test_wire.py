"""The client end of a connection (`WireConnection`): replies read ahead in one receive, and timeouts.

A scripted server on a thread answers AUTH, then does what each test tells it: replies packed into one
segment, an error frame shorter than the meta the client expects, or silence.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from nencache.net.buffers import BufferPool
from nencache.net.protocol import (
    HEADER_SIZE, MISSING, Code, Frame, Limits, Op, error_frame, hello, pack_lengths, reply_header, unpack_header,
)
from nencache.net.requests import fetch
from nencache.net.wire import ErrorReply, Target, WireConnection
from tests.server.util import chunk_blob
from tests.tiers.contract import make_key

LIMITS = Limits(max_chunk_bytes=1 << 20, max_request_bytes=2 << 20, max_keys=64)  # two keys per GET


def read_request(sock: socket.socket) -> Frame:
    header = sock.recv(HEADER_SIZE, socket.MSG_WAITALL)
    frame = unpack_header(header)
    if frame.meta_len:
        sock.recv(frame.meta_len, socket.MSG_WAITALL)
    return frame


@contextmanager
def scripted(script: Callable[[socket.socket], None]) -> Iterator[WireConnection]:
    """A connection to a server that answers AUTH, then runs `script` on its socket."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        sock, _ = listener.accept()
        with sock:
            auth = read_request(sock)
            body = hello(LIMITS, auth=False, idle_timeout=60.0)
            sock.sendall(reply_header(auth, 0, 0, len(body)) + body)
            script(sock)
            time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    conn = WireConnection(Target("127.0.0.1", listener.getsockname()[1]), 0.5, b"", BufferPool())
    try:
        yield conn
    finally:
        conn.close()
        thread.join(5)
        listener.close()


def test_pipelined_get_replies_in_one_segment_and_out_of_order_are_split_exactly() -> None:
    keys = [make_key(i) for i in range(5)]
    blobs = {key: chunk_blob(key, bytes([i]) * (100 + 1000 * i)) for i, key in enumerate(keys)}
    held = set(keys) - {keys[3]}

    def script(sock: socket.socket) -> None:
        requests = [read_request(sock) for _ in range(3)]  # 5 keys, 2 per GET
        out = []
        for frame, group in reversed(list(zip(requests, (keys[0:2], keys[2:4], keys[4:5])))):
            found = [blobs[k] for k in group if k in held]
            lengths = [len(blobs[k]) if k in held else MISSING for k in group]
            out.append(reply_header(frame, len(group), 8 * len(group), sum(map(len, found))) + pack_lengths(lengths))
            out.extend(found)
        # Every reply in one write, the last request's first: the client reads its header expecting the first
        # request's longer meta, so part of a blob comes in with it and must be taken from what was read ahead.
        sock.sendall(b"".join(out))

    with scripted(script) as conn:
        got = fetch(conn, b"ns", keys)
    assert [None if blob is None else bytes(blob) for blob in got] == [blobs[k] if k in held else None for k in keys]


def test_an_error_shorter_than_the_expected_meta_is_read_whole_and_the_connection_stays_usable() -> None:
    def script(sock: socket.socket) -> None:
        get = read_request(sock)  # a GET of 2 keys: the client reads its header with 16 bytes of meta
        header, body = error_frame(get.op, get.request_id, Code.BUSY, "no", closing=False)
        sock.sendall(header.pack() + body)
        ping = read_request(sock)
        sock.sendall(reply_header(ping, 0, 0, 0))

    with scripted(script) as conn:
        errors: list[ErrorReply] = []
        assert fetch(conn, b"ns", [make_key(1), make_key(2)], on_error=errors.append) == [None, None]
        assert len(errors) == 1 and errors[0].code == Code.BUSY and "no" in str(errors[0])
        assert conn.call(Op.PING).frame.op == Op.PING


def test_a_server_that_stops_answering_times_out_after_the_timeout_not_the_whole_deadline() -> None:
    def script(sock: socket.socket) -> None:
        read_request(sock)  # and never answer
        time.sleep(1.5)

    with scripted(script) as conn:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.call(Op.PING)
        assert 0.4 < time.monotonic() - started < 1.0  # timeout 0.5 s; the exchange's deadline is 2 s


def test_a_request_of_more_parts_than_one_sendmsg_takes_goes_out_whole_and_in_order() -> None:
    parts = [bytes([i % 251]) * (1 + i % 7) for i in range(700)]  # 702 buffers with the header and meta
    received: list[bytes] = []

    def script(sock: socket.socket) -> None:
        put = read_request(sock)
        received.append(sock.recv(put.body_len, socket.MSG_WAITALL))
        sock.sendall(reply_header(put, 0, 0, 0))

    with scripted(script) as conn:
        conn.call(Op.PUT, count=1, meta=b"m", body=[memoryview(p) for p in parts])
    assert received == [b"".join(parts)]
