"""The one byte format of a chunk outside memory: a 64-byte header, then the payload.

Every tier below memory (disk, Redis, server, peers) stores and moves exactly these bytes, so a
chunk written by one can be read by any other. See docs/format.md for the field table.

Layout (little-endian)::

    0  4s magic b"NENC"          32 I  payload crc32
    4  B  format version (1)     36 16s chunk key (zeros when unknown)
    5  B  codec id               52 I  codec parameter (e.g. codebook version; 0 if unused)
    6  B  dtype code (decoded)   56 4x reserved (zero)
    7  B  lossless wrapper id    60 I  header crc32 (over bytes 0..59)
    8  H  num_layers
    10 H  num_kv_heads
    12 H  head_dim
    14 2x reserved
    16 I  num_tokens
    20 4x reserved
    24 Q  payload length in bytes
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

try:  # ISA-L's CRC-32 gives zlib's exact values about 10x faster; zlib is the fallback
    from isal.isal_zlib import crc32 as _payload_crc32
except ImportError:  # pragma: no cover - isal is a dependency, but the format must not need it
    _payload_crc32 = zlib.crc32

from nencache.errors import CorruptChunkError

MAGIC = b"NENC"
VERSION = 1
HEADER_SIZE = 64
KEY_SIZE = 16
NO_KEY = bytes(KEY_SIZE)
_STRUCT = struct.Struct("<4sBBBBHHH2xI4xQI16sI4x")  # bytes 0..59; the header crc follows
_CRC = struct.Struct("<I")
assert _STRUCT.size + _CRC.size == HEADER_SIZE


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """What a chunk's bytes say about themselves."""

    codec_id: int
    dtype_code: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_tokens: int
    payload_len: int
    payload_crc: int
    key: bytes = NO_KEY
    wrapper_id: int = 0
    codec_param: int = 0

    def pack(self) -> bytes:
        body = _STRUCT.pack(
            MAGIC, VERSION, self.codec_id, self.dtype_code, self.wrapper_id,
            self.num_layers, self.num_kv_heads, self.head_dim, self.num_tokens,
            self.payload_len, self.payload_crc, self.key, self.codec_param,
        )
        return body + _CRC.pack(zlib.crc32(body))

    def with_key(self, key: bytes) -> "ChunkHeader":
        """The same header naming `key` (tiers stamp the key they store the chunk under)."""
        return ChunkHeader(
            self.codec_id, self.dtype_code, self.num_layers, self.num_kv_heads, self.head_dim,
            self.num_tokens, self.payload_len, self.payload_crc, key, self.wrapper_id, self.codec_param,
        )


def checksum(payload: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC-32 (zlib's polynomial and values) of the payload; `value` is the CRC of what came before it."""
    return _payload_crc32(payload, value)


def parse_header(blob: bytes | bytearray | memoryview) -> ChunkHeader:
    """Read and check the header at the start of `blob`; raise `CorruptChunkError` if it is damaged."""
    view = memoryview(blob)
    if len(view) < HEADER_SIZE:
        raise CorruptChunkError(f"chunk is {len(view)} bytes, shorter than its {HEADER_SIZE}-byte header")
    body = view[: _STRUCT.size]
    (stored_crc,) = _CRC.unpack_from(view, _STRUCT.size)
    if zlib.crc32(body) != stored_crc:
        raise CorruptChunkError("chunk header checksum mismatch (damaged or not a NenCache chunk)")
    (magic, version, codec_id, dtype_code, wrapper_id, layers, heads, head_dim, tokens,
     payload_len, payload_crc, key, codec_param) = _STRUCT.unpack(body)
    if magic != MAGIC:
        raise CorruptChunkError(f"bad magic {magic!r}: not a NenCache chunk")
    if version != VERSION:
        raise CorruptChunkError(f"chunk format version {version} is not supported (this build reads {VERSION})")
    return ChunkHeader(codec_id, dtype_code, layers, heads, head_dim, tokens, payload_len, payload_crc,
                       key, wrapper_id, codec_param)


def split_blob(
    blob: bytes | bytearray | memoryview, expected_key: bytes | None = None, verify: bool = True
) -> tuple[ChunkHeader, memoryview]:
    """Check a whole chunk (header, length, key, payload checksum) and return its header and payload view."""
    header = parse_header(blob)
    view = memoryview(blob)
    payload = view[HEADER_SIZE:]
    if len(payload) != header.payload_len:
        raise CorruptChunkError(
            f"chunk payload is {len(payload)} bytes but its header says {header.payload_len} (truncated or padded)"
        )
    if expected_key is not None and header.key != NO_KEY and header.key != expected_key:
        raise CorruptChunkError("chunk was stored under another key (misplaced or overwritten value)")
    if verify and checksum(payload) != header.payload_crc:
        raise CorruptChunkError("chunk payload checksum mismatch (corrupted bytes)")
    return header, payload


def join_blob(header: ChunkHeader, payload: bytes | bytearray | memoryview) -> bytes:
    """Header + payload as one bytes object (one copy of the payload)."""
    return header.pack() + bytes(payload) if not isinstance(payload, bytes) else header.pack() + payload
