"""Shared data and bounds for the codec tests."""

from __future__ import annotations

import torch

from nencache.codecs import VQCodec, get_codec
from nencache.codecs.vq_codebook import CodebookStore

LOSSLESS = ["raw", "zstd", "lz4"]
BASES = ["int8", "fp8", "int4", "vq"]
LOSSY = BASES + ["zstd+int8", "lz4+int8", "zstd+fp8", "zstd+int4", "lz4+int4", "zstd+vq"]
ALL = LOSSLESS + LOSSY
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Relative Frobenius error ||decoded - x|| / ||x|| per K and V on `synthetic_kv` (measured about a
# third to a half of these; real SmolLM2-135M KV: int8 0.006, fp8 0.027, int4 0.10, vq 0.18).
REL_BOUND = {"int8": 0.012, "fp8": 0.04, "int4": 0.15, "vq": 0.35}


def base_of(name: str) -> str:
    return name.split("+")[-1] if "+" in name else ("raw" if name in ("zstd", "lz4") else name)


def make_codec(name: str):
    """A codec by name; vq codecs get a private codebook store so tests do not share codebooks."""
    if base_of(name) == "vq":
        return get_codec(name, store=CodebookStore(), calibration_tokens=512)
    return get_codec(name)


def synthetic_kv(layers: int = 2, tokens: int = 64, heads: int = 2, head_dim: int = 16,
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """KV shaped like a real model's: keys with offset and outlier channels, values with per-token scales."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, tokens, heads, head_dim, generator=gen)
    channel_scale = torch.ones(head_dim)
    channel_scale[:: max(1, head_dim // 4)] = 8.0
    keys = keys * channel_scale + torch.randn(head_dim, generator=gen) * 2
    values = torch.randn(layers, tokens, heads, head_dim, generator=gen)
    values = values * torch.rand(layers, tokens, heads, 1, generator=gen).add(0.2)
    return torch.stack([keys, values], dim=1).to(dtype)


def rel_error(decoded: torch.Tensor, original: torch.Tensor, part: int) -> float:
    a, b = decoded[:, part].double(), original[:, part].double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def affine_bound(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Per-element error bound of a grid of `levels` steps: keys per channel, values per token.

    Half a step, the step being the group's range (widened by the bf16 rounding of its minimum) over
    the levels, plus a rounding of the decoded value to the chunk's dtype.
    """
    x = x.double()
    keys, values = x[:, 0], x[:, 1]
    def bound(part: torch.Tensor, dim: int) -> torch.Tensor:
        lo, hi = part.amin(dim, keepdim=True), part.amax(dim, keepdim=True)
        step = (hi - lo + lo.abs() * 2**-7) / levels * (1 + 2**-7)
        return (0.5 * step + part.abs() * 2**-7).expand_as(part)
    return torch.stack([bound(keys, 1), bound(values, -1)], dim=1)


def calibrated_vq(x: torch.Tensor, bits: int = 6) -> VQCodec:
    codec = VQCodec(bits=bits, store=CodebookStore(), auto_calibrate=False)
    codec.calibrate([x])
    return codec


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bit patterns (so -0.0 differs from 0.0)."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))


def engine_layouts(x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """`x` as an engine hands it over: contiguous, a token slice of a larger cache, each head's values strided."""
    layers, _, tokens, heads, head_dim = x.shape
    whole = torch.zeros(layers, 2, tokens + 9, heads, head_dim, dtype=x.dtype)
    whole[:, :, 4 : 4 + tokens] = x
    apart = x.transpose(3, 4).contiguous().transpose(3, 4)
    return [("contiguous", x), ("token slice", whole[:, :, 4 : 4 + tokens]), ("heads apart", apart)]
