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

from nencache.codecs import kernels
from nencache.codecs.common import (
    CodesWriter, InPlaceSectionCodec, Spec, bad_param, check_header, read_sections, section_bytes,
)
from nencache.errors import ConfigError, LayoutError
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
class Int4Codec(InPlaceSectionCodec):
    """4-bit codes: keys per channel in groups of `key_group` tokens (0 = the whole chunk), values per
    token in groups of `value_group` channels (0 = the whole head; used only if it divides head_dim);
    the first `exact_tokens` tokens of each chunk kept as they are. The loops over the chunk are
    `nencache.codecs.kernels`."""

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

    def payload_spec(self, shape: torch.Size, dtype: torch.dtype) -> Spec:
        layers, _, tokens, heads, head_dim = shape
        return self._params(tokens, head_dim).spec(dtype, layers, tokens, heads, head_dim)

    def warm_up(self, dtype: torch.dtype) -> None:
        """Compile (or load from numba's cache) the loops for chunks of `dtype`."""
        chunk = torch.linspace(-1, 1, 24, dtype=dtype).view(1, 2, 3, 2, 2)
        self.decode_into(self.encode(chunk), torch.empty_like(chunk))

    def encode_parts(self, chunk: torch.Tensor) -> tuple[list[torch.Tensor], int, CodesWriter]:
        """The exact tokens and the grid parameters of `chunk`, the header's codec parameter and the writer of
        its packed codes."""
        layers, _, tokens, heads, head_dim = chunk.shape
        params = self._params(tokens, head_dim)
        exact, body, rest = chunk[:, :, :params.exact], chunk[:, :, params.exact:], tokens - params.exact
        spec = params.spec(chunk.dtype, layers, tokens, heads, head_dim)
        if rest == 0:
            return [exact, *(torch.empty(shape, dtype=dt) for dt, shape in spec[1:-1])], params.pack(), lambda c: None
        key_group, value_group = params.key or rest, params.value or head_dim
        source = kernels.readable(body)
        lo_hi = kernels.grouped_ranges(source, key_group, value_group)
        if lo_hi is None:
            raise LayoutError("chunk contains NaN or inf values; lossy codecs need finite KV (use raw for these)")
        (low, step), _ = kernels.grid_params(*lo_hi, _LEVELS)
        inv = step.float().reciprocal()
        bias = -low.float() * inv
        split = layers * params.key_count(rest) * heads * head_dim
        sections = [low[:split], step[:split], low[split:], step[split:]]
        parts = [t.view(shape) for t, (_, shape) in zip(sections, spec[1:-1])]

        def write(codes: torch.Tensor) -> None:
            kernels.quantize_packed(source, key_group, value_group, bias[:split], inv[:split], bias[split:],
                                    inv[split:], _LEVELS, codes)

        return [exact, *parts], params.pack(), write

    def payload_sections(self, header: ChunkHeader, payload: memoryview, copy: bool) -> list[torch.Tensor]:
        dtype = check_header(header, self.codec_id, self.name)
        layers, tokens, heads, head_dim = header.num_layers, header.num_tokens, header.num_kv_heads, header.head_dim
        params = _Params.unpack(header.codec_param)
        rest = tokens - params.exact
        if rest < 0 or 0 < rest <= params.key or params.value and (head_dim % params.value or params.value >= head_dim):
            raise bad_param(self.name, header.codec_param)
        return read_sections(payload, params.spec(dtype, layers, tokens, heads, head_dim), copy)

    def decode_sections_into(self, header: ChunkHeader, sections: list[torch.Tensor], out: torch.Tensor) -> None:
        params = _Params.unpack(header.codec_param)
        exact, key_low, key_step, val_low, val_step, codes = sections
        out[:, :, :params.exact] = exact
        rest = header.num_tokens - params.exact
        if rest == 0:
            return
        key_group, value_group = params.key or rest, params.value or header.head_dim
        kernels.decode_to(out[:, :, params.exact:], lambda target: kernels.dequantize_packed(
            codes, key_group, value_group, key_low, key_step, val_low, val_step, target))

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        params = self._params(num_tokens, layout.head_dim)
        spec = params.spec(layout.dtype, layout.num_layers, num_tokens, layout.num_kv_heads, layout.head_dim)
        return HEADER_SIZE + section_bytes(spec)
