"""The NenCache wire protocol: 32-byte frame headers, op and error codes, and the meta sections.

A frame is a fixed header, then `meta_len` bytes of meta (namespace, keys, lengths), then `body_len`
bytes of body (chunk blobs, JSON, messages). docs/protocol.md is the full description. Little-endian.
"""

from __future__ import annotations

import hmac
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from nencache.errors import NenCacheError
from nencache.format import HEADER_SIZE as CHUNK_HEADER_SIZE

MAGIC = b"NENS"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIIIQ")  # magic, version, op, flags, request id, count, meta len, status, body len
HEADER_SIZE = HEADER.size
KEY_SIZE = 16
MAX_NAMESPACE = 255
MAX_TOKEN = 1024
MAX_MESSAGE = 1024
MISSING = 0  # the length a GET reply gives for a key it does not hold (a blob is never empty)
UNPLACED = 1  # the offset a LOCATE reply gives (with length 0) for a chunk held, but not in shared memory
SPOT = struct.Struct("<QQQ")  # LOCATE reply, per key: offset, length, page generation
NONCE_SIZE = 16
_NAMESPACE = re.compile(rb"[A-Za-z0-9._:\-]{1,255}")
assert HEADER_SIZE == 32


class Op(IntEnum):
    PING = 1
    AUTH = 2
    EXISTS = 3
    GET = 4
    PUT = 5
    DELETE = 6
    CLEAR = 7
    STATS = 8
    SHARED = 9  # where this server's pool can be mapped by a client on the same machine
    LOCATE = 10  # where chunks sit in that mapped pool


class Flag(IntFlag):
    RESPONSE = 1
    ERROR = 2
    CLOSING = 4  # the server closes the connection after this frame


class Code(IntEnum):
    """Error codes of error frames; the body carries a message saying what to do."""

    BAD_FRAME = 1
    UNSUPPORTED = 2
    TOO_LARGE = 3
    AUTH_REQUIRED = 4
    AUTH_FAILED = 5
    BAD_CHUNK = 6
    BUSY = 7
    INTERNAL = 8
    SHUTTING_DOWN = 9


KEYED_OPS = frozenset({Op.EXISTS, Op.GET, Op.PUT, Op.DELETE, Op.CLEAR, Op.LOCATE})
# Per frame, plain lookups and ints: `Op(...)` and `&` on an IntFlag cost about a microsecond each.
OPS = {int(op): op for op in Op}  # a request's op byte -> its Op
RESPONSE, ERROR, CLOSING = int(Flag.RESPONSE), int(Flag.ERROR), int(Flag.CLOSING)


class ProtocolError(NenCacheError):
    """Bytes on the wire break the protocol. `code` is what the server answers; `fatal` closes the connection."""

    def __init__(self, code: Code, message: str, *, fatal: bool = True) -> None:
        super().__init__(message)
        self.code, self.fatal = code, fatal


@dataclass(slots=True)
class Frame:
    """One frame header."""

    op: int
    request_id: int
    count: int = 0
    meta_len: int = 0
    body_len: int = 0
    flags: int = 0
    status: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, self.op, self.flags, self.request_id, self.count, self.meta_len,
                           self.status, self.body_len)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & ERROR)


def reply_meta_size(op: int, count: int) -> int:
    """Bytes of meta in a (non-error) reply to a request of `op` for `count` keys: GET's blob lengths,
    LOCATE's nonce and spots; nothing for the other ops."""
    if op == Op.GET:
        return 8 * count
    return NONCE_SIZE + SPOT.size * count if op == Op.LOCATE else 0


def request_header(op: int, request_id: int, count: int, meta_len: int, body_len: int) -> bytes:
    """The packed header of a request (`Frame.pack` without building the frame)."""
    return HEADER.pack(MAGIC, VERSION, op, 0, request_id, count, meta_len, 0, body_len)


def reply_header(request: Frame, count: int, meta_len: int, body_len: int) -> bytes:
    """The packed header of a (non-error) reply to `request`."""
    return HEADER.pack(MAGIC, VERSION, request.op, RESPONSE, request.request_id, count, meta_len, 0, body_len)


def unpack_header(buf: bytes | bytearray | memoryview) -> Frame:
    """Parse a header; bad magic or version raise `ProtocolError`."""
    magic, version, op, flags, request_id, count, meta_len, status, body_len = HEADER.unpack(buf)
    if magic != MAGIC:
        raise ProtocolError(Code.BAD_FRAME, f"bad frame magic {magic!r}: this port speaks the NenCache protocol")
    if version != VERSION:
        raise ProtocolError(Code.UNSUPPORTED, f"protocol version {version} is not supported (this server speaks "
                                              f"{VERSION}); use a matching NenCache client")
    return Frame(op, request_id, count, meta_len, body_len, flags, status)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one frame may carry. The server checks every request against these before allocating."""

    max_chunk_bytes: int
    max_request_bytes: int
    max_keys: int

    @property
    def max_get_keys(self) -> int:
        """Keys in one GET: bounded so one reply pins at most `max_request_bytes` of pool pages."""
        return max(1, min(self.max_keys, self.max_request_bytes // self.max_chunk_bytes))

    def as_dict(self) -> dict[str, int]:
        return {"max_chunk_bytes": self.max_chunk_bytes, "max_request_bytes": self.max_request_bytes,
                "max_keys": self.max_keys, "max_get_keys": self.max_get_keys}


def check_request(frame: Frame, limits: Limits) -> Op:
    """Check a request header against the protocol and `limits` (nothing is allocated before this passes);
    its op."""
    if frame.flags:
        raise ProtocolError(Code.BAD_FRAME, f"request flags must be 0, got {frame.flags:#x}")
    if frame.status:
        raise ProtocolError(Code.BAD_FRAME, "request status field must be 0")
    op = OPS.get(frame.op)
    if op is None:
        raise ProtocolError(Code.UNSUPPORTED, f"unknown op {frame.op}; this server knows "
                                              f"{', '.join(o.name for o in Op)}")
    if op in (Op.PING, Op.STATS, Op.SHARED):
        expected_meta, max_body = 0, 0
    elif op is Op.AUTH:
        if frame.meta_len > MAX_TOKEN:
            raise ProtocolError(Code.TOO_LARGE, f"auth token longer than {MAX_TOKEN} bytes")
        expected_meta, max_body = frame.meta_len, 0
    else:
        max_count = limits.max_get_keys if op is Op.GET else (0 if op is Op.CLEAR else limits.max_keys)
        if frame.count > max_count:
            raise ProtocolError(Code.TOO_LARGE, f"{frame.count} keys in one {op.name} frame; this server takes "
                                                f"at most {max_count}: split the request")
        per_key = KEY_SIZE + (8 if op is Op.PUT else 0)
        if not 2 <= frame.meta_len <= 1 + MAX_NAMESPACE + frame.count * per_key:
            raise ProtocolError(Code.BAD_FRAME, f"{op.name} meta of {frame.meta_len} bytes does not fit "
                                                f"{frame.count} keys")
        expected_meta = frame.meta_len
        max_body = limits.max_request_bytes if op is Op.PUT else 0
    if frame.meta_len != expected_meta:
        raise ProtocolError(Code.BAD_FRAME, f"{op.name} takes no meta section")
    if frame.body_len > max_body:
        code = Code.TOO_LARGE if max_body else Code.BAD_FRAME
        raise ProtocolError(code, f"{op.name} body of {frame.body_len} bytes; at most {max_body} allowed")
    return op


def pack_keyed_meta(namespace: bytes, keys: Sequence[bytes], lengths: Sequence[int] | None = None) -> bytes:
    """Namespace (u8 length + bytes), then the 16-byte keys, then (PUT) one u64 length per key."""
    parts = [bytes((len(namespace),)), namespace, *keys]
    if lengths is not None:
        parts.append(struct.pack(f"<{len(lengths)}Q", *lengths))
    return b"".join(parts)


def parse_keyed_meta(op: Op, count: int, meta: memoryview, limits: Limits) -> tuple[bytes, list[bytes], list[int]]:
    """Namespace, keys and (PUT) blob lengths of a checked keyed request; `ProtocolError` if inconsistent."""
    namespace = check_namespace(bytes(meta[1 : 1 + meta[0]]))
    per_key = KEY_SIZE + (8 if op is Op.PUT else 0)
    if len(meta) != 1 + len(namespace) + count * per_key:
        raise ProtocolError(Code.BAD_FRAME, f"{op.name} meta is {len(meta)} bytes; a {len(namespace)}-byte "
                                            f"namespace and {count} keys need {1 + len(namespace) + count * per_key}")
    start = 1 + len(namespace)
    keys = [bytes(meta[start + i * KEY_SIZE : start + (i + 1) * KEY_SIZE]) for i in range(count)]
    lengths: list[int] = []
    if op is Op.PUT:
        lengths = list(struct.unpack_from(f"<{count}Q", meta, start + count * KEY_SIZE))
        for length in lengths:
            if not CHUNK_HEADER_SIZE <= length <= limits.max_chunk_bytes:
                raise ProtocolError(Code.TOO_LARGE, f"a blob of {length} bytes; blobs hold {CHUNK_HEADER_SIZE} to "
                                                    f"{limits.max_chunk_bytes} bytes (server_max_chunk_bytes)")
    return namespace, keys, lengths


def check_namespace(namespace: bytes) -> bytes:
    if not _NAMESPACE.fullmatch(namespace):
        raise ProtocolError(Code.BAD_FRAME, "a namespace is 1-255 characters of A-Z a-z 0-9 . _ : -")
    return namespace


def pack_lengths(lengths: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(lengths)}Q", *lengths)


def unpack_lengths(meta: bytes | bytearray | memoryview, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{count}Q", meta)


def check_authed(op: Op, authed: bool) -> None:
    """Before a connection has authenticated, only PING and AUTH are answered."""
    if not authed and op not in (Op.PING, Op.AUTH):
        raise ProtocolError(Code.AUTH_REQUIRED, "this server requires an auth token: send AUTH first "
                                                "(set auth_token or NENCACHE_AUTH_TOKEN on the client)")


def check_token(token: bytes, expected: bytes | None) -> None:
    """AUTH's check: the server's token (any token where the server takes none), compared in constant time."""
    if expected is not None and not hmac.compare_digest(token, expected):
        raise ProtocolError(Code.AUTH_FAILED, "wrong auth token; give the client the server's auth_token "
                                              "(NENCACHE_AUTH_TOKEN)")


def hello(limits: Limits, *, auth: bool, idle_timeout: float) -> bytes:
    """AUTH's reply body: the limits a client must keep to on this connection, and how long it may idle."""
    return json.dumps({"server": "nencache", "protocol": VERSION, "auth": auth, **limits.as_dict(),
                       "idle_timeout": idle_timeout}).encode()


def error_frame(op: int, request_id: int, code: Code, message: str, *, closing: bool) -> tuple[Frame, bytes]:
    """An error reply: header and its UTF-8 message body (cut to `MAX_MESSAGE` bytes)."""
    body = message.encode("utf-8", "replace")[:MAX_MESSAGE]
    flags = Flag.RESPONSE | Flag.ERROR | (Flag.CLOSING if closing else 0)
    return Frame(op & 0xFF, request_id, 0, 0, len(body), int(flags), int(code)), body
