"""The fp8 codec's compiled loops against torch: its float8_e4m3fn conversion for every value a code can take
(rounding ties and subnormals included), and scales, codes and decoded values the same bit for bit as torch
computing them step by step, for every element type and for chunks read or written where they are."""

from __future__ import annotations

import pytest
import torch

from nencache.codecs import get_codec
from nencache.format import split_blob

from tests.codecs.helpers import DTYPES, engine_layouts, same_bits, synthetic_kv

E4M3 = torch.float8_e4m3fn


def torch_encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8's scales (fp32 `[layers, 2, heads]`) and codes, in torch ops."""
    absmax = x.abs().amax(dim=(2, 4)).float()
    scale = (absmax / 448.0).clamp_min(torch.finfo(torch.float32).tiny)
    codes = (x.float() * scale.reciprocal()[:, :, None, :, None]).clamp(-448.0, 448.0).to(E4M3)
    return scale, codes.view(torch.uint8)


def torch_decode(scale: torch.Tensor, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.view(E4M3).float() * scale[:, :, None, :, None]).to(dtype)


def test_codes_are_torchs_float8_conversion_for_every_value() -> None:
    """With 448 in every (layer, K/V, head) the scale is 1, so a code is the conversion of the value itself."""
    grid = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    grid = grid[grid.isfinite()].unique()
    ties = (grid[1:] + grid[:-1]) / 2  # halfway between neighbouring codes: rounding to even decides
    bf16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf16 = bf16[bf16.isfinite() & (bf16.abs() <= 448)]
    near = torch.cat([ties, grid]) * (1 + torch.tensor([-1e-7, 1e-7]).view(-1, 1))
    values = torch.cat([grid, ties, -ties, near.reshape(-1), bf16, torch.randn(4096) * 100,
                        torch.tensor([448.0, -0.0])]).clamp(-448, 448)
    x = torch.stack([values, values.flip(0)]).view(1, 2, -1, 1, 1)
    codec = get_codec("fp8")
    header, payload = split_blob(codec.encode(x))
    scale, codes = codec.payload_sections(header, payload, copy=True)
    assert torch.equal(scale, torch.ones_like(scale))
    assert torch.equal(codes, x.to(E4M3).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("magnitude", [1.0, 1e-4, 300.0])  # 1e-4: many subnormal codes
def test_scales_codes_and_decoded_values_are_torchs_bit_for_bit(dtype: torch.dtype, magnitude: float) -> None:
    codec = get_codec("fp8")
    x = (synthetic_kv(layers=3, tokens=33, heads=2, head_dim=16, dtype=torch.float32, seed=4) * magnitude).to(dtype)
    x[1, 0, 5, 1, 3] = -0.0
    scale, codes = torch_encode(x)
    decoded = torch_decode(scale, codes, dtype)
    for label, chunk in engine_layouts(x):
        blob = codec.encode(chunk)
        header, payload = split_blob(blob)
        got_scale, got_codes = codec.payload_sections(header, payload, copy=True)
        assert same_bits(got_scale, scale) and same_bits(got_codes, codes), label
        for name, out in engine_layouts(torch.full_like(x, 3.0)):
            codec.decode_into(blob, out)
            assert same_bits(out.contiguous(), decoded), (label, name)
