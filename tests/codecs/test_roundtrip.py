"""Round trips of every codec x dtype: bit-exact for lossless, bounded error for lossy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nencache.codecs import get_codec
from nencache.errors import CorruptChunkError, LayoutError
from nencache.format import HEADER_SIZE, parse_header
from nencache.layout import KVLayout

from tests.codecs.helpers import (
    ALL, DTYPES, LOSSLESS, LOSSY, REL_BOUND, affine_bound, base_of, make_codec, rel_error, synthetic_kv,
)

KEY = bytes(range(16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ALL)
def test_round_trip(name: str, dtype: torch.dtype) -> None:
    codec = make_codec(name)
    x = synthetic_kv(layers=3, tokens=96, heads=2, head_dim=32, dtype=dtype)
    blob = codec.encode(x, KEY)
    assert isinstance(blob, bytes)
    y = codec.decode(blob, expected_key=KEY)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert len(blob) <= codec.max_encoded_size(KVLayout(3, 2, 32, dtype), 96)
    assert parse_header(blob).key == KEY
    if name in LOSSLESS:
        assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))
        return
    base = base_of(name)
    for part in (0, 1):
        assert rel_error(y, x, part) < REL_BOUND[base], (name, part)
    if base in ("int8", "int4"):
        err = (y.double() - x.double()).abs()
        assert (err <= affine_bound(x, 255 if base == "int8" else 15)).all()
    if base == "fp8":  # e4m3 keeps 3 mantissa bits: relative error <= 2**-4, plus its subnormal spacing
        scale = x.double().abs().amax(dim=(2, 4), keepdim=True) / 448
        bound = x.double().abs() * (2**-4 + 2**-7) + scale * 2**-9
        assert ((y.double() - x.double()).abs() <= bound).all()


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_codecs_compress(name: str) -> None:
    codec = make_codec(name)
    x = synthetic_kv(layers=2, tokens=256, heads=2, head_dim=64)
    ratio = x.numel() * 2 / len(codec.encode(x))
    minimum = {"int8": 1.9, "fp8": 1.95, "int4": 3.6, "vq": 4.5}[base_of(name)]
    assert ratio >= minimum


@pytest.mark.parametrize("name", ["int8", "fp8", "int4", "vq"])
def test_encoded_size_is_exact_for_quantizers(name: str) -> None:
    codec = make_codec(name)
    for tokens in (1, 7, 256, 300):
        x = synthetic_kv(layers=2, tokens=tokens, heads=3, head_dim=10)
        assert len(codec.encode(x)) == codec.max_encoded_size(KVLayout(2, 3, 10), tokens)


def test_int4_groups() -> None:
    x = synthetic_kv(layers=2, tokens=100, heads=2, head_dim=64)
    grouped = get_codec("int4", key_group=32, value_group=32)
    y = grouped.decode(grouped.encode(x))
    plain = get_codec("int4")
    z = plain.decode(plain.encode(x))
    assert y.shape == x.shape
    assert rel_error(y, x, 0) < rel_error(z, x, 0) and rel_error(y, x, 1) < rel_error(z, x, 1)
    # a decoder reads the groups from the header, whatever its own settings
    assert torch.equal(plain.decode(grouped.encode(x)), y)
    assert len(grouped.encode(x)) == grouped.max_encoded_size(KVLayout(2, 2, 64), 100)


def test_int8_grid_parameter_types() -> None:
    """fp16 grid parameters where fp16 holds them (finer than bf16), bf16 ones elsewhere; both decode."""
    codec = get_codec("int8")
    x = synthetic_kv(layers=2, tokens=128, heads=2, head_dim=64, dtype=torch.float32)
    fp16_blob = codec.encode(x)
    assert parse_header(fp16_blob).codec_param == 1
    for factor in (1e-30, 1e30):  # outside fp16's range: bf16 parameters, same size
        blob = codec.encode(x * factor)
        assert parse_header(blob).codec_param == 0 and len(blob) == len(fp16_blob)
        y = codec.decode(blob).double()
        assert ((y - x.double() * factor).abs() <= affine_bound(x * factor, 255)).all()
    one_token = x[:, :, :1]  # constant key channels: no fp16 step is as fine as the bf16 one
    assert parse_header(codec.encode(one_token)).codec_param == 0
    y = codec.decode(fp16_blob).double()
    header = parse_header(fp16_blob)
    forged = dataclasses.replace(header, codec_param=2)
    with pytest.raises(CorruptChunkError, match="codec parameter"):
        codec.decode(forged.pack() + fp16_blob[HEADER_SIZE:])
    for part in (0, 1):
        assert rel_error(y, x, part) < REL_BOUND["int8"]


def test_wrapped_and_plain_forms_decode() -> None:
    x = synthetic_kv(tokens=64)
    zstd_int8, int8 = get_codec("zstd+int8"), get_codec("int8")
    wrapped = zstd_int8.encode(x)
    assert parse_header(wrapped).wrapper_id == 1
    assert torch.equal(zstd_int8.decode(wrapped), int8.decode(int8.encode(x)))
    assert torch.equal(zstd_int8.decode(int8.encode(x)), int8.decode(int8.encode(x)))  # unwrapped form
    with pytest.raises(CorruptChunkError):
        int8.decode(wrapped)


def test_incompressible_payload_is_stored_unwrapped() -> None:
    noise = torch.randint(0, 256, (1, 2, 64, 1, 16), dtype=torch.uint8).view(torch.float16)
    noise = torch.where(noise.isfinite(), noise, torch.zeros_like(noise))
    codec = get_codec("lz4")
    blob = codec.encode(noise)
    assert parse_header(blob).wrapper_id == 0
    assert torch.equal(codec.decode(blob).view(torch.uint8), noise.view(torch.uint8))


def test_wrong_key_is_refused() -> None:
    codec = get_codec("int8")
    blob = codec.encode(synthetic_kv(), KEY)
    with pytest.raises(CorruptChunkError):
        codec.decode(blob, expected_key=bytes(16 * [7]))
    with pytest.raises(LayoutError):
        codec.encode(synthetic_kv(), b"short")


@pytest.mark.parametrize("name", ["int8", "fp8", "int4", "vq", "zstd+int4"])
def test_bad_input_is_a_layout_error(name: str) -> None:
    codec = make_codec(name)
    with pytest.raises(LayoutError):
        codec.encode(torch.zeros(2, 3, 4, 2, 8))
    with pytest.raises(LayoutError):
        codec.encode(torch.zeros(2, 2, 4, 2, 8, dtype=torch.int32))
    bad = synthetic_kv(dtype=torch.float32)
    bad[0, 0, 5, 0, 0] = float("nan")
    with pytest.raises(LayoutError):
        codec.encode(bad)


def test_non_contiguous_input() -> None:
    x = synthetic_kv(tokens=64)
    view = x[:, :, ::2]
    for name in ("int8", "fp8", "int4"):
        codec = get_codec(name)
        assert torch.equal(codec.decode(codec.encode(view)), codec.decode(codec.encode(view.contiguous())))


def test_large_and_tiny_magnitudes() -> None:
    x = synthetic_kv(dtype=torch.float32)
    for factor in (1e-30, 1e30):
        for name in ("int8", "fp8", "int4"):
            codec = get_codec(name)
            y = codec.decode(codec.encode(x * factor))
            assert torch.isfinite(y).all()
            assert rel_error(y, x * factor, 0) < REL_BOUND[name]
    constant = torch.full((1, 2, 8, 1, 4), 3.0)
    for name in ("int8", "fp8", "int4", "vq"):
        codec = make_codec(name)
        assert torch.allclose(codec.decode(codec.encode(constant)), constant, rtol=2**-7)
