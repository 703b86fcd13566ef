"""`Int4Codec`: KIVI-style 4-bit quantization (about 3.66x vs bf16 with the defaults).

Keys are quantized per channel over groups of `key_group` tokens (outlier channels get their own
grid); values per token over groups of `value_group` channels. Each group has a bf16 (min, step)
grid of 16 levels.

KIVI keeps its newest tokens in full precision; a stored chunk has no "newest" tokens, but its first
token may be the sequence's attention sink, whose keys stretch every key channel's grid and whose
errors every later query sees. Keeping the first `exact_tokens` (default 1) tokens of each chunk in
the chunk's own dtype costs 1.4% of the size and cut the perplexity change on SmolLM2-135M from
+1.25% to +0.46%; a 16-token window costs 23% for no further gain.

Codec parameter: `key_group | value_group << 16 | exact << 24` as written (a group of 0 = the whole
axis; exact = the number of leading tokens kept as they are).
Payload (little-endian, in order; R = exact, T = tokens - R, G = ceil(T / key_group),
V = head_dim / value_group)::

    exact     dtype [layers, 2, R, kv_heads, head_dim]   the first R tokens, unchanged
    key_low   bf16 [layers, G, kv_heads, head_dim]
    key_step  bf16 [layers, G, kv_heads, head_dim]
    val_low   bf16 [layers, T, kv_heads, V]
    val_step  bf16 [layers, T, kv_heads, V]
    codes     u8   [layers, 2, T, kv_heads, ceil(head_dim / 2)]
              two codes a byte along head_dim, the even channel in the low nibble; x ~= low + step * code
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from nencache.codecs.common import (
    SectionCodec,
    affine_params, bad_param, check_header, dequantize, layer_blocks, pack_nibbles, quantize_into,
    read_sections, section_bytes, unpack_nibbles,
)
from nencache.errors import ConfigError
from nencache.format import HEADER_SIZE, ChunkHeader
from nencache.layout import KVLayout

_LEVELS = 15


@dataclasses.dataclass(frozen=True, slots=True)
class _Params:
    key: int    # tokens per key group as written (0 = all tokens)
    value: int  # channels per value group as written (0 = the whole head_dim)
    exact: int  # leading tokens kept unchanged

    @classmethod
    def unpack(cls, param: int) -> _Params:
        return cls(param & 0xFFFF, (param >> 16) & 0xFF, param >> 24)

    def pack(self) -> int:
        return self.key | self.value << 16 | self.exact << 24

    def key_count(self, tokens: int) -> int:
        return -(-tokens // self.key) if self.key else min(tokens, 1)

    def value_count(self, head_dim: int) -> int:
        return head_dim // self.value if self.value else 1

    def spec(self, dtype: torch.dtype, layers: int, tokens: int, heads: int,
             head_dim: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        bf, rest = torch.bfloat16, tokens - self.exact
        g, v = self.key_count(rest), self.value_count(head_dim)
        return [(dtype, (layers, 2, self.exact, heads, head_dim)),
                (bf, (layers, g, heads, head_dim)), (bf, (layers, g, heads, head_dim)),
                (bf, (layers, rest, heads, v)), (bf, (layers, rest, heads, v)),
                (torch.uint8, (layers, 2, rest, heads, (head_dim + 1) // 2))]


@dataclasses.dataclass(slots=True)
class Int4Codec(SectionCodec):
    """4-bit codes: keys per channel in groups of `key_group` tokens (0 = the whole chunk), values per
    token in groups of `value_group` channels (0 = the whole head; used only if it divides head_dim);
    the first `exact_tokens` tokens of each chunk kept as they are."""

    key_group: int = 0
    value_group: int = 0
    exact_tokens: int = 1
    name: ClassVar[str] = "int4"
    codec_id: ClassVar[int] = 3
    lossy: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for field, top in (("key_group", 0xFFFF), ("value_group", 0xFF), ("exact_tokens", 0xFF)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise ConfigError(f"Int4Codec.{field} must be an int in 0..{top}, got {value!r}")

    def _params(self, tokens: int, head_dim: int) -> _Params:
        exact = min(self.exact_tokens, tokens)
        key = self.key_group if 0 < self.key_group < tokens - exact else 0
        value = self.value_group if 0 < self.value_group < head_dim and head_dim % self.value_group == 0 else 0
        return _Params(key, value, exact)

    def encode_sections(self, chunk: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """The payload sections of `chunk` and the header's codec parameter."""
        layers, _, tokens, heads, head_dim = chunk.shape
        params = self._params(tokens, head_dim)
        exact, chunk, tokens = chunk[:, :, :params.exact], chunk[:, :, params.exact:], tokens - params.exact
        if tokens == 0:
            spec = params.spec(chunk.dtype, layers, params.exact, heads, head_dim)[1:]
            return [exact, *(torch.empty(shape, dtype=dt) for dt, shape in spec)], params.pack()
        g, v = params.key_count(tokens), params.value_count(head_dim)
        keys = chunk[:, 0]
        if g * (params.key or tokens) != tokens:  # a partial last group: repeat the last token into it
            pad = g * params.key - tokens
            keys = torch.cat([keys, keys[:, -1:].expand(layers, pad, heads, head_dim)], dim=1)
        keys = keys.reshape(layers, g, -1, heads, head_dim)
        key_low, key_step = affine_params(keys.amin(2).float(), keys.amax(2).float(), _LEVELS)
        key_codes = torch.empty(keys.shape, dtype=torch.uint8)
        quantize_into(key_codes, keys, key_low[:, :, None], key_step[:, :, None], _LEVELS)
        values = chunk[:, 1].reshape(layers, tokens, heads, v, -1)
        val_low, val_step = affine_params(values.amin(-1).float(), values.amax(-1).float(), _LEVELS)
        val_codes = torch.empty(values.shape, dtype=torch.uint8)
        quantize_into(val_codes, values, val_low[..., None], val_step[..., None], _LEVELS)
        codes = torch.empty((layers, 2, tokens, heads, (head_dim + 1) // 2), dtype=torch.uint8)
        codes[:, 0] = pack_nibbles(key_codes.reshape(layers, -1, heads, head_dim)[:, :tokens])
        codes[:, 1] = pack_nibbles(val_codes.reshape(layers, tokens, heads, head_dim))
        return [exact, key_low, key_step, val_low, val_step, codes], params.pack()

    def decode_payload(self, header: ChunkHeader, payload: memoryview) -> torch.Tensor:
        """Decode a checked payload (used by the lossless wrappers after decompressing)."""
        dtype = check_header(header, self.codec_id, self.name)
        layers, tokens, heads, head_dim = header.num_layers, header.num_tokens, header.num_kv_heads, header.head_dim
        params = _Params.unpack(header.codec_param)
        rest = tokens - params.exact
        if rest < 0 or 0 < rest <= params.key or params.value and (head_dim % params.value or params.value >= head_dim):
            raise bad_param(self.name, header.codec_param)
        exact, key_low, key_step, val_low, val_step, codes = read_sections(
            payload, params.spec(dtype, layers, tokens, heads, head_dim))
        out = torch.empty((layers, 2, tokens, heads, head_dim), dtype=dtype)
        out[:, :, :params.exact] = exact
        if rest == 0:
            return out
        g, v = params.key_count(rest), params.value_count(head_dim)
        padded = g * (params.key or rest)
        klo, kst = key_low.float()[:, :, None], key_step.float()[:, :, None]
        vlo, vst = val_low.float()[..., None], val_step.float()[..., None]
        body = out[:, :, params.exact:]
        for block in layer_blocks(layers, 2 * padded * heads * head_dim):
            n = block.stop - block.start
            key_codes = unpack_nibbles(codes[block, 0], head_dim)
            if padded != rest:
                key_codes = torch.nn.functional.pad(key_codes, (0, 0, 0, 0, 0, padded - rest))
            keys = dequantize(key_codes.reshape(n, g, -1, heads, head_dim), klo[block], kst[block])
            body[block, 0] = keys.reshape(n, padded, heads, head_dim)[:, :rest]
            val_codes = unpack_nibbles(codes[block, 1], head_dim).reshape(n, rest, heads, v, -1)
            body[block, 1] = dequantize(val_codes, vlo[block], vst[block]).reshape(n, rest, heads, head_dim)
        return out

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        params = self._params(num_tokens, layout.head_dim)
        spec = params.spec(layout.dtype, layout.num_layers, num_tokens, layout.num_kv_heads, layout.head_dim)
        return HEADER_SIZE + section_bytes(spec)
