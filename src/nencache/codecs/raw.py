"""`RawCodec`: the chunk's own bytes, unchanged, behind the header. Bit-exact, no compute."""

from __future__ import annotations

import warnings

import torch

from nencache.errors import CorruptChunkError
from nencache.format import HEADER_SIZE, NO_KEY, ChunkHeader, checksum, split_blob
from nencache.layout import CODE_DTYPES, DTYPE_CODES, KVLayout


def tensor_bytes(chunk: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (copies only if it is not contiguous)."""
    flat = chunk.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def header_for(chunk: torch.Tensor, codec_id: int, payload: memoryview | bytes, key: bytes,
               wrapper_id: int = 0, codec_param: int = 0) -> ChunkHeader:
    """The header describing `chunk` encoded as `payload`."""
    layers, two, tokens, heads, head_dim = chunk.shape
    assert two == 2, "chunk must be [layers, 2, tokens, kv_heads, head_dim]"
    return ChunkHeader(codec_id, DTYPE_CODES[chunk.dtype], layers, heads, head_dim, tokens,
                       len(payload), checksum(payload), key, wrapper_id, codec_param)


class RawCodec:
    """Stores the tensor bytes as they are."""

    name = "raw"
    codec_id = 0
    lossy = False
    zero_copy = True

    def encode(self, chunk: torch.Tensor, key: bytes = NO_KEY) -> bytes:
        if chunk.dim() != 5 or chunk.shape[1] != 2:
            raise ValueError(f"chunk must be [layers, 2, tokens, kv_heads, head_dim], got {tuple(chunk.shape)}")
        payload = tensor_bytes(chunk.cpu())
        return b"".join((header_for(chunk, self.codec_id, payload, key).pack(), payload))

    def decode(self, blob: bytes | bytearray | memoryview, expected_key: bytes | None = None) -> torch.Tensor:
        header, payload = split_blob(blob, expected_key)
        dtype, shape = self._geometry(header, len(payload))
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) else torch.empty(0, dtype=torch.uint8)
        return data.view(dtype).reshape(shape)

    def _geometry(self, header: ChunkHeader, payload_len: int) -> tuple[torch.dtype, tuple[int, ...]]:
        if header.codec_id != self.codec_id:
            raise CorruptChunkError(f"chunk was encoded with codec id {header.codec_id}, not raw")
        if header.wrapper_id:
            raise CorruptChunkError(f"chunk is wrapped (lossless wrapper id {header.wrapper_id}); decode it with that codec")
        dtype = CODE_DTYPES.get(header.dtype_code)
        if dtype is None:
            raise CorruptChunkError(f"chunk has unknown dtype code {header.dtype_code}")
        shape = (header.num_layers, 2, header.num_tokens, header.num_kv_heads, header.head_dim)
        itemsize = dtype.itemsize
        if header.num_layers * 2 * header.num_tokens * header.num_kv_heads * header.head_dim * itemsize != payload_len:
            raise CorruptChunkError(f"raw payload of {payload_len} bytes does not hold a {shape} {dtype} chunk")
        return dtype, shape

    def view(self, blob: bytes | bytearray | memoryview, expected_key: bytes | None = None, *,
             verify: bool = True) -> torch.Tensor:
        """Like `decode`, checked the same way, but without copying: the tensor aliases `blob`'s memory.

        For callers that copy the chunk somewhere else at once (the cache's promotion path); the
        tensor is read-only in spirit and must not outlive `blob`. `verify=False` skips only the
        payload checksum, for blobs whose tier has just checked it (header, length and key still are).
        """
        header, payload = split_blob(blob, expected_key, verify)
        dtype, shape = self._geometry(header, len(payload))
        if not len(payload):
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # a read-only buffer is fine: the view is only read
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(payload, dtype=torch.uint8)
        return data.view(dtype).reshape(shape)

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        return HEADER_SIZE + layout.nbytes(num_tokens)
