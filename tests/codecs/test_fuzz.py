"""Damaged, truncated, foreign and forged bytes: decoders raise `CorruptChunkError`, nothing else."""

from __future__ import annotations

import dataclasses
import random
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nencache.codecs import decode_any
from nencache.errors import CorruptChunkError
from nencache.format import HEADER_SIZE, ChunkHeader, parse_header

from tests.codecs.helpers import ALL, base_of, make_codec, synthetic_kv

_CODECS = {name: make_codec(name) for name in ALL}
_X = synthetic_kv(layers=2, tokens=24, heads=2, head_dim=12)
_BLOBS = {name: codec.encode(_X) for name, codec in _CODECS.items()}


def _expect_corrupt(name: str, blob: bytes) -> None:
    with pytest.raises(CorruptChunkError):
        _CODECS[name].decode(blob)


def _decodes_or_corrupt(name: str, blob: bytes) -> None:
    """Forged bytes with valid checksums: a well-formed tensor of the header's shape, or CorruptChunkError."""
    try:
        y = _CODECS[name].decode(blob)
    except CorruptChunkError:
        return
    h = parse_header(blob)
    assert y.shape == (h.num_layers, 2, h.num_tokens, h.num_kv_heads, h.head_dim)


def _restamp(header: ChunkHeader, payload: bytes) -> bytes:
    return dataclasses.replace(header, payload_len=len(payload), payload_crc=zlib.crc32(payload)).pack() + payload


@pytest.mark.parametrize("name", ALL)
def test_bit_flips(name: str) -> None:
    blob, rng = _BLOBS[name], random.Random(name)
    positions = list(range(HEADER_SIZE)) + rng.sample(range(HEADER_SIZE, len(blob)), min(200, len(blob) - HEADER_SIZE))
    for pos in positions:
        damaged = bytearray(blob)
        damaged[pos] ^= 1 << rng.randrange(8)
        _expect_corrupt(name, bytes(damaged))


@pytest.mark.parametrize("name", ALL)
def test_truncation_and_padding(name: str) -> None:
    blob, rng = _BLOBS[name], random.Random(name)
    for size in [0, 1, HEADER_SIZE - 1, HEADER_SIZE, len(blob) - 1] + rng.sample(range(len(blob)), 50):
        _expect_corrupt(name, blob[:size])
    _expect_corrupt(name, blob + b"\0")
    _expect_corrupt(name, blob + blob)


@pytest.mark.parametrize("name", ALL)
def test_junk(name: str) -> None:
    rng = random.Random(name)
    for size in (0, 10, 64, 100, 5000):
        _expect_corrupt(name, rng.randbytes(size))
        _expect_corrupt(name, b"NENC" + rng.randbytes(size))


def _accepts(decoder: str, blob: bytes) -> bool:
    header = parse_header(blob)
    wrapper = {"zstd": 1, "lz4": 2}.get(decoder.split("+")[0], 0) if decoder.split("+")[0] in ("zstd", "lz4") else 0
    same_base = {"raw": 0, "int8": 1, "fp8": 2, "int4": 3, "vq": 4}[base_of(decoder)] == header.codec_id
    return same_base and header.wrapper_id in {0, wrapper}


@pytest.mark.parametrize("decoder", ALL)
def test_wrong_codec(decoder: str) -> None:
    for writer, blob in _BLOBS.items():
        if _accepts(decoder, blob):
            assert _CODECS[decoder].decode(blob).shape == _X.shape
        else:
            _expect_corrupt(decoder, blob)


@pytest.mark.parametrize("name", ALL)
def test_forged_payloads(name: str) -> None:
    """Junk or damaged payloads that carry valid checksums never crash a decoder."""
    blob, rng = _BLOBS[name], random.Random(name)
    header, payload = parse_header(blob), blob[HEADER_SIZE:]
    for _ in range(30):
        damaged = bytearray(payload)
        for _ in range(rng.randrange(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        _decodes_or_corrupt(name, _restamp(header, bytes(damaged)))
        _decodes_or_corrupt(name, _restamp(header, bytes(damaged[: rng.randrange(len(damaged))])))
        _decodes_or_corrupt(name, _restamp(header, rng.randbytes(rng.randrange(2 * len(payload)))))


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(ALL), field=st.sampled_from(
    ["codec_id", "dtype_code", "num_layers", "num_kv_heads", "head_dim", "num_tokens", "wrapper_id", "codec_param"]),
    value=st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)))
def test_forged_headers(name: str, field: str, value: int) -> None:
    """Any header field set to any value (checksums fixed up): a right-shaped tensor or CorruptChunkError."""
    blob = _BLOBS[name]
    header = parse_header(blob)
    limit = {"codec_id": 0xFF, "dtype_code": 0xFF, "wrapper_id": 0xFF, "num_layers": 0xFFFF,
             "num_kv_heads": 0xFFFF, "head_dim": 0xFFFF}.get(field, 0xFFFFFFFF)
    forged = dataclasses.replace(header, **{field: value & limit})
    forged_blob = forged.pack() + blob[HEADER_SIZE:]
    _decodes_or_corrupt(name, forged_blob)
    try:
        decode_any(forged_blob)
    except CorruptChunkError:
        pass


def test_decode_any_reads_every_codec() -> None:
    for name, blob in _BLOBS.items():
        if base_of(name) == "vq":
            continue  # private codebook store
        assert decode_any(blob).shape == _X.shape


def test_truncated_everything_in_decode_any() -> None:
    blob = _BLOBS["zstd+int4"]
    for size in range(0, len(blob), 7):
        with pytest.raises(CorruptChunkError):
            decode_any(blob[:size])


def test_empty_tensor_shapes() -> None:
    x = torch.zeros(1, 2, 0, 1, 4, dtype=torch.bfloat16)
    for name in ("raw", "int8", "fp8", "int4", "zstd+int8"):
        codec = make_codec(name)
        assert codec.decode(codec.encode(x)).shape == x.shape
