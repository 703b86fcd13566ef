"""Pieces shared by the quantizing codecs: input checks, payload sections, blob framing, affine quantization.

A quantizing codec turns a chunk into a list of tensors (its payload sections, in a fixed order whose
sizes follow from the header alone) and back. `build_blob` frames the sections behind the 64-byte
header; `check_header` vets a checked blob's header and `read_sections` cuts its payload into
tensors again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from nencache.errors import CorruptChunkError, LayoutError
from nencache.format import HEADER_SIZE, KEY_SIZE, NO_KEY, ChunkHeader, checksum, split_blob
from nencache.layout import CODE_DTYPES, DTYPE_CODES

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# A header claiming a decoded chunk larger than this is refused before anything is allocated.
MAX_DECODED_BYTES = 1 << 32
# Smallest positive normal bf16: the floor of a stored scale, so a constant group never divides by zero.
_TINY = torch.finfo(torch.bfloat16).tiny
_UP = 1.0 + 2.0**-8  # bf16 rounds to nearest with relative error <= 2**-9, so x * _UP rounds to >= x

Spec = Sequence[tuple[torch.dtype, tuple[int, ...]]]


def check_chunk(chunk: object) -> torch.Tensor:
    """Return `chunk` as a CPU tensor if it is a `[layers, 2, tokens, kv_heads, head_dim]` float chunk."""
    if not isinstance(chunk, torch.Tensor):
        raise LayoutError(f"chunk must be a torch.Tensor, got {type(chunk).__name__}")
    if chunk.dim() != 5 or chunk.shape[1] != 2:
        raise LayoutError(f"chunk must be [layers, 2, tokens, kv_heads, head_dim], got {tuple(chunk.shape)}")
    if chunk.dtype not in FLOAT_DTYPES:
        raise LayoutError(f"lossy codecs take fp32, fp16 or bf16 chunks, got {chunk.dtype}; convert it first")
    if any(n > 0xFFFF for n in (chunk.shape[0], chunk.shape[3], chunk.shape[4])) or chunk.shape[2] > 0xFFFFFFFF:
        raise LayoutError(f"chunk shape {tuple(chunk.shape)} exceeds the header's field widths")
    return chunk.detach().cpu()


def section_bytes(spec: Spec) -> int:
    """Total payload size of sections `(dtype, shape)`."""
    total = 0
    for dtype, shape in spec:
        count = 1
        for n in shape:
            count *= n
        total += count * dtype.itemsize
    return total


def check_key(key: object) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise LayoutError(f"a chunk key is {KEY_SIZE} bytes (see nencache.keys), got {key!r:.40}")


def chunk_header(chunk: torch.Tensor, codec_id: int, size: int, crc: int, key: bytes, codec_param: int) -> ChunkHeader:
    """The header of `chunk` encoded into `size` payload bytes of checksum `crc`."""
    layers, _, tokens, heads, head_dim = chunk.shape
    return ChunkHeader(codec_id, DTYPE_CODES[chunk.dtype], layers, heads, head_dim, tokens, size, crc, key,
                       0, codec_param)


def build_blob(chunk: torch.Tensor, codec_id: int, sections: Sequence[torch.Tensor], key: bytes = NO_KEY,
               codec_param: int = 0) -> bytes:
    """Header + the raw bytes of `sections`, back to back (one copy of each)."""
    check_key(key)
    views = [memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) for t in sections if t.numel()]
    crc, size = 0, 0
    for view in views:
        crc = checksum(view, crc)
        size += len(view)
    header = chunk_header(chunk, codec_id, size, crc, key, codec_param)
    return b"".join([header.pack(), *views])


def check_header(header: ChunkHeader, codec_id: int, name: str) -> torch.dtype:
    """Raise `CorruptChunkError` unless `header` names this codec, an unwrapped payload and a sane chunk;
    return the decoded dtype."""
    if header.wrapper_id != 0:
        raise CorruptChunkError(
            f"chunk carries lossless wrapper id {header.wrapper_id}; decode it with the codec that wrote it "
            "(e.g. 'zstd+...' or 'lz4+...'), or use nencache.codecs.decode_any"
        )
    if header.codec_id != codec_id:
        raise CorruptChunkError(f"chunk was encoded with codec id {header.codec_id}, not {name} ({codec_id})")
    dtype = CODE_DTYPES.get(header.dtype_code)
    if dtype not in FLOAT_DTYPES:
        raise CorruptChunkError(f"chunk has dtype code {header.dtype_code}, which {name} never writes")
    if min(header.num_layers, header.num_kv_heads, header.head_dim) == 0:
        raise CorruptChunkError("chunk header has a zero layer, head or head_dim count")
    decoded = header.num_layers * 2 * header.num_tokens * header.num_kv_heads * header.head_dim
    if decoded * dtype.itemsize > MAX_DECODED_BYTES:
        raise CorruptChunkError(f"chunk header claims {decoded} values, more than any chunk this build decodes")
    return dtype


def bad_param(name: str, value: int) -> CorruptChunkError:
    """The error for a codec parameter that `name` never writes."""
    return CorruptChunkError(f"{name} chunk has codec parameter {value:#x}, which {name} never writes")


def read_sections(payload: memoryview, spec: Spec, copy: bool = True) -> list[torch.Tensor]:
    """Cut `payload` into tensors of `spec`; raise `CorruptChunkError` if its size does not match.

    With `copy=False` (a writable `payload` only) the tensors are views of it: valid while it is."""
    expected = section_bytes(spec)
    if expected != len(payload):
        raise CorruptChunkError(f"payload is {len(payload)} bytes, but a chunk of this shape needs {expected}")
    if not expected:
        data = torch.empty(0, dtype=torch.uint8)
    else:
        data = torch.frombuffer(bytearray(payload) if copy or payload.readonly else payload, dtype=torch.uint8)
    out, offset = [], 0
    for dtype, shape in spec:
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        out.append(data[offset:offset + nbytes].view(dtype).reshape(shape))
        offset += nbytes
    return out


def affine_params(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (min, step) covering [lo, hi] with `levels` steps: min rounded down, step rounded up.

    Rounding in these directions keeps every value of the group inside the grid, so the bf16 storage
    of the parameters costs no extra error; bf16 keeps fp32's range, so no input overflows them.
    """
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise LayoutError("chunk contains NaN or inf values; lossy codecs need finite KV (use raw for these)")
    low = (lo - lo.abs() * (_UP - 1.0)).to(torch.bfloat16)
    step = ((hi - low.float()) / levels * _UP).clamp_min(_TINY).to(torch.bfloat16)
    if not torch.isfinite(step).all():
        raise LayoutError("chunk values span more than fp32 can scale; use the raw codec for this chunk")
    return low, step


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes < 16 two per byte along the last dim (padded to even with a zero code)."""
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: the first `width` codes of each row."""
    out = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return out[..., :width] if out.shape[-1] != width else out


__all__ = [
    "FLOAT_DTYPES", "MAX_DECODED_BYTES", "affine_params", "bad_param", "build_blob",
    "InPlaceSectionCodec", "check_chunk", "check_header", "check_key", "chunk_header",
    "pack_nibbles", "read_sections", "section_bytes", "unpack_nibbles",
]


class SectionCodec:
    """Base of the codecs whose payload is a list of tensor sections (`encode_sections`)."""

    __slots__ = ()
    codec_id: ClassVar[int]
    zero_copy: ClassVar[bool] = False

    def encode_sections(self, chunk: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        raise NotImplementedError

    def decode_payload(self, header: ChunkHeader, payload: memoryview) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, chunk: torch.Tensor, key: bytes = NO_KEY) -> bytes:
        chunk = check_chunk(chunk)
        sections, param = self.encode_sections(chunk)
        return build_blob(chunk, self.codec_id, sections, key, param)

    def decode(self, blob: bytes | bytearray | memoryview, expected_key: bytes | None = None) -> torch.Tensor:
        return self.decode_payload(*split_blob(blob, expected_key))


Reserve = Callable[[int], torch.Tensor]
CodesWriter = Callable[[torch.Tensor], None]


class InPlaceSectionCodec(SectionCodec):
    """A section codec whose last section, the codes (nearly all of a blob's bytes), is written straight into
    a buffer the caller reserves (`encode_into`) and decoded straight into the caller's tensor (`decode_into`).

    Neither makes a chunk-sized temporary (blob, codes, decoded chunk): the working memory of a chunk is its
    small grid parameters (the compiled loops of `nencache.codecs.kernels` write codes and values in place),
    so what the process's allocator keeps of it stays small however many chunks pass through.
    """

    __slots__ = ()

    def payload_spec(self, shape: torch.Size, dtype: torch.dtype) -> Spec:
        """The payload's sections for a chunk of `shape` and `dtype` (dtypes of the right sizes; the codes last)."""
        raise NotImplementedError

    def encode_parts(self, chunk: torch.Tensor) -> tuple[list[torch.Tensor], int, CodesWriter]:
        """The sections before the codes, the header's codec parameter, and a writer of the codes into a
        tensor of the last section's dtype and shape. Raises for a chunk it cannot encode before writing."""
        raise NotImplementedError

    def payload_sections(self, header: ChunkHeader, payload: memoryview, copy: bool) -> list[torch.Tensor]:
        """The sections of a checked payload (`read_sections`), after vetting the header for this codec."""
        raise NotImplementedError

    def decode_sections_into(self, header: ChunkHeader, sections: list[torch.Tensor], out: torch.Tensor) -> None:
        """Write the chunk `sections` (of a payload with `header`) hold into `out` (its shape and dtype, any
        strides, CPU)."""
        raise NotImplementedError

    def encode_sections(self, chunk: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        head, param, write = self.encode_parts(chunk)
        dtype, shape = self.payload_spec(chunk.shape, chunk.dtype)[-1]
        codes = torch.empty(shape, dtype=dtype)
        write(codes)
        return [*head, codes], param

    def encode_into(self, chunk: torch.Tensor, reserve: Reserve, key: bytes = NO_KEY) -> int:
        check_key(key)
        chunk = check_chunk(chunk)
        head, param, write = self.encode_parts(chunk)
        spec = self.payload_spec(chunk.shape, chunk.dtype)
        size = section_bytes(spec)
        dest = reserve(HEADER_SIZE + size)
        payload = dest[HEADER_SIZE : HEADER_SIZE + size]
        offset = 0
        for section in head:
            data = section.contiguous().reshape(-1).view(torch.uint8)
            payload[offset : offset + data.numel()].copy_(data)
            offset += data.numel()
        dtype, shape = spec[-1]
        write(payload[offset:].view(dtype).view(shape))
        crc = checksum(memoryview(payload.numpy())) if size else 0
        header = chunk_header(chunk, self.codec_id, size, crc, key, param).pack()
        dest[:HEADER_SIZE].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        return HEADER_SIZE + size

    def decode_payload(self, header: ChunkHeader, payload: memoryview) -> torch.Tensor:
        """Decode a checked payload (used by the lossless wrappers after decompressing)."""
        sections = self.payload_sections(header, payload, copy=True)
        out = torch.empty(_decoded_shape(header), dtype=CODE_DTYPES[header.dtype_code])
        self.decode_sections_into(header, sections, out)
        return out

    def decode_into(self, blob: bytes | bytearray | memoryview, out: torch.Tensor,
                    expected_key: bytes | None = None, verify: bool = True) -> None:
        header, payload = split_blob(blob, expected_key, verify)
        sections = self.payload_sections(header, payload, copy=False)
        shape, dtype = _decoded_shape(header), CODE_DTYPES[header.dtype_code]
        if tuple(out.shape) != shape or out.dtype != dtype or out.device.type != "cpu":
            raise LayoutError(f"chunk decodes to {shape} {dtype}; got an output of {tuple(out.shape)} {out.dtype} "
                              f"on {out.device}: pass a CPU tensor of the chunk's shape and dtype")
        self.decode_sections_into(header, sections, out)


def _decoded_shape(header: ChunkHeader) -> tuple[int, int, int, int, int]:
    return (header.num_layers, 2, header.num_tokens, header.num_kv_heads, header.head_dim)
