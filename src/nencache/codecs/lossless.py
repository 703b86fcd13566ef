"""Lossless wrappers: zstd or lz4 over another codec's payload (header field `wrapper_id`).

A wrapped chunk keeps the inner codec's header fields (codec id, codec parameter, geometry) and sets
`wrapper_id` (zstd = 1, lz4 = 2). Its payload is::

    u64 LE  length of the inner payload
    ...     the inner payload compressed: one zstd frame (with its content size) or one lz4 block

When compression would not shrink the payload, the chunk is written unwrapped (`wrapper_id` 0):
exactly the inner codec's bytes. So `max_encoded_size` is the inner codec's, and a wrapper decodes
both forms.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import ClassVar

import torch

from nencache.codecs.base import Codec
from nencache.codecs.raw import RawCodec
from nencache.errors import ConfigError, CorruptChunkError
from nencache.format import HEADER_SIZE, NO_KEY, ChunkHeader, checksum, parse_header, split_blob
from nencache.layout import CODE_DTYPES, KVLayout

_LENGTH = struct.Struct("<Q")


def _raw_payload(header: ChunkHeader, payload: memoryview) -> torch.Tensor:
    """Decode an unwrapped raw payload (what `RawCodec.decode` does after its checks)."""
    dtype = CODE_DTYPES.get(header.dtype_code)
    if header.codec_id != RawCodec.codec_id or header.wrapper_id != 0 or dtype is None:
        raise CorruptChunkError(f"chunk was encoded with codec id {header.codec_id}, not raw")
    shape = (header.num_layers, 2, header.num_tokens, header.num_kv_heads, header.head_dim)
    count = shape[0] * 2 * shape[2] * shape[3] * shape[4]
    if count * dtype.itemsize != len(payload):
        raise CorruptChunkError(f"raw payload of {len(payload)} bytes does not hold a {shape} {dtype} chunk")
    if not count:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(shape)


@dataclasses.dataclass(slots=True)
class _Wrapper:
    inner: Codec = dataclasses.field(default_factory=RawCodec)
    wrapper_id: ClassVar[int] = 0
    prefix: ClassVar[str] = ""
    zero_copy: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.prefix if self.inner.zero_copy else f"{self.prefix}+{self.inner.name}"  # raw inside: just "zstd"

    @property
    def codec_id(self) -> int:
        return self.inner.codec_id

    @property
    def lossy(self) -> bool:
        return self.inner.lossy

    def _compress(self, data: memoryview) -> bytes:
        raise NotImplementedError

    def _decompress(self, data: memoryview, size: int) -> bytes | bytearray:
        raise NotImplementedError

    def encode(self, chunk: torch.Tensor, key: bytes = NO_KEY) -> bytes:
        blob = self.inner.encode(chunk, key)
        header = parse_header(blob)
        payload = memoryview(blob)[HEADER_SIZE:]
        packed = self._compress(payload)
        if _LENGTH.size + len(packed) >= len(payload):
            return blob  # incompressible: the inner codec's bytes, unwrapped
        wrapped = _LENGTH.pack(len(payload)) + packed
        header = dataclasses.replace(header, payload_len=len(wrapped), payload_crc=checksum(wrapped),
                                     wrapper_id=self.wrapper_id)
        return header.pack() + wrapped

    def decode(self, blob: bytes | bytearray | memoryview, expected_key: bytes | None = None) -> torch.Tensor:
        header, payload = split_blob(blob, expected_key)
        if header.wrapper_id == self.wrapper_id:
            header, payload = self._unwrap(header, payload)
        elif header.wrapper_id != 0:
            raise CorruptChunkError(f"chunk carries wrapper id {header.wrapper_id}, not {self.prefix} "
                                    f"({self.wrapper_id}); decode it with nencache.codecs.decode_any")
        return self.decode_payload(header, payload)

    def decode_payload(self, header: ChunkHeader, payload: memoryview) -> torch.Tensor:
        """Decode an unwrapped payload with the inner codec."""
        if self.inner.zero_copy:  # raw bytes inside
            return _raw_payload(header, payload)
        decode = getattr(self.inner, "decode_payload", None)
        if decode is None:  # a codec from elsewhere: hand it a whole blob
            body = dataclasses.replace(header, payload_len=len(payload), payload_crc=checksum(payload))
            return self.inner.decode(body.pack() + bytes(payload))
        return decode(header, payload)

    def _unwrap(self, header: ChunkHeader, payload: memoryview) -> tuple[ChunkHeader, memoryview]:
        if header.codec_id != self.inner.codec_id:
            raise CorruptChunkError(f"chunk was encoded with codec id {header.codec_id}, not {self.inner.name}")
        if len(payload) < _LENGTH.size:
            raise CorruptChunkError(f"{self.prefix} payload is shorter than its length prefix")
        (size,) = _LENGTH.unpack_from(payload)
        dtype = CODE_DTYPES.get(header.dtype_code) or torch.uint8
        decoded = header.num_layers * 2 * header.num_tokens * header.num_kv_heads * header.head_dim
        if size > 2 * decoded * dtype.itemsize + 65536:
            raise CorruptChunkError(f"{self.prefix} payload claims {size} bytes, more than any codec writes "
                                    "for a chunk of this shape")
        try:
            inner = self._decompress(payload[_LENGTH.size:], size)
        except CorruptChunkError:
            raise
        except Exception as exc:  # each library has its own error types; all mean damaged bytes
            raise CorruptChunkError(f"{self.prefix} payload does not decompress ({exc})") from None
        if len(inner) != size:
            raise CorruptChunkError(f"{self.prefix} payload decompressed to {len(inner)} bytes, not {size}")
        return dataclasses.replace(header, wrapper_id=0, payload_len=size), memoryview(inner)

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        return self.inner.max_encoded_size(layout, num_tokens)


@dataclasses.dataclass(slots=True)
class ZstdCodec(_Wrapper):
    """zstd (`level` 1..22; 3 is a good default) over `inner` (default raw)."""

    level: int = 3
    wrapper_id: ClassVar[int] = 1
    prefix: ClassVar[str] = "zstd"

    def __post_init__(self) -> None:
        _require("zstandard", "zstd")
        if not isinstance(self.level, int) or not 1 <= self.level <= 22:
            raise ConfigError(f"zstd level must be an int in 1..22, got {self.level!r}")

    def _compress(self, data: memoryview) -> bytes:
        import zstandard

        return zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(data)

    def _decompress(self, data: memoryview, size: int) -> bytes:
        import zstandard

        if zstandard.frame_content_size(data) != size:
            raise CorruptChunkError("zstd frame does not declare the payload size its prefix gives")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)


@dataclasses.dataclass(slots=True)
class Lz4Codec(_Wrapper):
    """lz4 block compression (very fast, lower ratio) over `inner` (default raw)."""

    wrapper_id: ClassVar[int] = 2
    prefix: ClassVar[str] = "lz4"

    def __post_init__(self) -> None:
        _require("lz4", "lz4")

    def _compress(self, data: memoryview) -> bytes:
        import lz4.block

        return lz4.block.compress(data, store_size=False)

    def _decompress(self, data: memoryview, size: int) -> bytearray:
        import lz4.block

        return lz4.block.decompress(data, uncompressed_size=size, return_bytearray=True)


def _require(module: str, name: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"the {name} codec needs the '{module}' package: pip install 'nencache[compress]'") from None


WRAPPERS: dict[str, type[_Wrapper]] = {"zstd": ZstdCodec, "lz4": Lz4Codec}
WRAPPER_IDS: dict[int, type[_Wrapper]] = {cls.wrapper_id: cls for cls in WRAPPERS.values()}
