"""int8 and fp8 in place: `encode_into` writes the same bytes as `encode` (and as the codecs wrote before they
could encode in place), `decode_into` the same values as `decode`, and neither makes chunk-sized temporaries."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from nencache.codecs import get_codec
from nencache.codecs.base import EncodesInPlace
from nencache.errors import CorruptChunkError, LayoutError
from nencache.format import HEADER_SIZE, parse_header
from nencache.layout import KVLayout

from tests.codecs.helpers import synthetic_kv

KEY = bytes(range(16))
IN_PLACE = ["int8", "fp8", "int4"]

# sha256 (first 16 bytes) of `encode(x, KEY)` as these codecs wrote it when each chunk was encoded whole
# (codes in their own tensor, then joined behind the header): the format must not move.
GOLDEN = {
    ("int8", "torch.float32-3x96"): "21373e00a1d5fb9b10848c8e2d2778a2",
    ("int8", "torch.float16-3x96"): "c3a00048a9e9dc6bef0167c2a075c9d5",
    ("int8", "torch.bfloat16-3x96"): "f4884c2019c49ddfc29613e8412091dd",
    ("int8", "constant-groups"): "d20b81929ecfa5339c3c70732fe3018b",
    ("int8", "empty"): "d8ba01f463507565859dc12e9e246409",
    ("fp8", "torch.float32-3x96"): "efc948489c253e4d4b7aac97017133ff",
    ("fp8", "torch.float16-3x96"): "8ceb64337ef5f28e9fa382f8983153ac",
    ("fp8", "torch.bfloat16-3x96"): "73e1bf8c1a0bd6febdb2d4a3a5543c2a",
    ("fp8", "constant-groups"): "9582f92dde96abdd346077bf45dd2155",
    ("fp8", "empty"): "f0ccbcc152ef7f90245a580ce66d3dea",
    ("int4", "torch.float32-3x96"): "fc88b549c7a8386d3ad2786cecba7d2f",
    ("int4", "torch.float16-3x96"): "33070931cef6806c52c903e0fb9ac2d8",
    ("int4", "torch.bfloat16-3x96"): "343f9a98f596c470a68bf392ecc2ebda",
    ("int4", "constant-groups"): "a405e3fad39ca7cec0f8f7f4be849be0",
    ("int4", "empty"): "b0549f60b29fea1fe3fbd5bb69e39093",
}


def cases() -> Iterator[tuple[str, torch.Tensor]]:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        yield f"{dtype}-3x96", synthetic_kv(layers=3, tokens=96, heads=2, head_dim=32, dtype=dtype)
    x = synthetic_kv(layers=2, tokens=17, heads=3, head_dim=8, dtype=torch.bfloat16, seed=5)
    x[0, 0, :, 1, :] = 0.25  # constant key groups: int8 falls back to bf16 grid parameters
    x[1, 1, 3] = -0.0
    yield "constant-groups", x
    yield "empty", synthetic_kv(layers=2, tokens=0, heads=1, head_dim=4)


def encode_into_buffer(codec, x: torch.Tensor, spare: int = 100) -> tuple[torch.Tensor, int]:
    """`encode_into` a buffer larger than needed, filled with 0x5A first; the buffer and the blob's size."""
    buffer = torch.full((codec.max_encoded_size(KVLayout(x.shape[0], x.shape[3], x.shape[4], x.dtype), x.shape[2])
                         + spare,), 0x5A, dtype=torch.uint8)
    asked: list[int] = []

    def reserve(size: int) -> torch.Tensor:
        asked.append(size)
        return buffer[:size]

    size = codec.encode_into(x, reserve, KEY)
    assert asked == [size]
    return buffer, size


@pytest.mark.parametrize("name", IN_PLACE)
def test_encode_into_writes_the_bytes_encode_always_wrote(name: str) -> None:
    codec = get_codec(name)
    assert isinstance(codec, EncodesInPlace)
    for label, x in cases():
        blob = codec.encode(x, KEY)
        assert hashlib.sha256(blob).hexdigest()[:32] == GOLDEN[(name, label)], label
        buffer, size = encode_into_buffer(codec, x)
        assert bytes(buffer[:size].numpy()) == blob, label
        assert (buffer[size:] == 0x5A).all(), "wrote past the blob"
    if name == "int8":  # both grid-parameter dtypes went through the in-place path above
        assert parse_header(codec.encode(dict(cases())["constant-groups"])).codec_param == 0
        assert parse_header(codec.encode(dict(cases())["torch.bfloat16-3x96"])).codec_param == 1


@pytest.mark.parametrize("name", IN_PLACE)
def test_encode_into_reads_a_strided_chunk_where_it_is(name: str) -> None:
    codec = get_codec(name)
    whole = synthetic_kv(layers=3, tokens=64, heads=2, head_dim=16)
    part = whole[:, :, 16:48]  # not contiguous
    buffer, size = encode_into_buffer(codec, part)
    assert bytes(buffer[:size].numpy()) == codec.encode(part.contiguous(), KEY)


@pytest.mark.parametrize("name", IN_PLACE)
def test_decode_into_matches_decode_in_a_strided_output(name: str) -> None:
    codec = get_codec(name)
    for label, x in cases():
        blob = codec.encode(x, KEY)
        expected = codec.decode(blob, expected_key=KEY)
        canvas = torch.full((x.shape[0], 2, x.shape[2] + 5, x.shape[3], x.shape[4]), 7.0, dtype=x.dtype)
        out = canvas[:, :, 2 : 2 + x.shape[2]]
        codec.decode_into(blob, out, expected_key=KEY)  # read-only bytes: decoded from a private copy
        assert torch.equal(out, expected), label
        out.zero_()
        buffer, size = encode_into_buffer(codec, x)
        codec.decode_into(memoryview(buffer[:size].numpy()), out, expected_key=KEY)  # writable: read in place
        assert torch.equal(out, expected), label
        assert (canvas[:, :, :2] == 7).all() and (canvas[:, :, 2 + x.shape[2]:] == 7).all(), label


@pytest.mark.parametrize("name", IN_PLACE)
def test_decode_into_refuses_a_mismatched_output_and_damaged_bytes(name: str) -> None:
    codec = get_codec(name)
    x = synthetic_kv(layers=2, tokens=8, heads=2, head_dim=8)
    blob = codec.encode(x, KEY)
    with pytest.raises(LayoutError, match="pass a CPU tensor"):
        codec.decode_into(blob, torch.empty(2, 2, 9, 2, 8, dtype=x.dtype))
    with pytest.raises(LayoutError, match="pass a CPU tensor"):
        codec.decode_into(blob, torch.empty(x.shape, dtype=torch.float32))
    damaged = bytearray(blob)
    damaged[HEADER_SIZE + 3] ^= 1
    out = torch.zeros_like(x)
    with pytest.raises(CorruptChunkError):
        codec.decode_into(damaged, out)
    with pytest.raises(CorruptChunkError):
        codec.decode_into(blob, out, expected_key=bytes(16))
    assert not out.any(), "a refused chunk wrote into the output"


@pytest.mark.parametrize("name", IN_PLACE)
def test_encode_into_refuses_bad_input_before_reserving(name: str) -> None:
    codec = get_codec(name)
    x = synthetic_kv(layers=2, tokens=8, heads=2, head_dim=8)
    x[1, 0, 3, 1, 2] = float("nan")
    reserved: list[int] = []
    with pytest.raises(LayoutError, match="NaN"):
        codec.encode_into(x, lambda size: reserved.append(size) or torch.empty(size, dtype=torch.uint8), KEY)
    assert reserved == []


def peak_allocated(fn: Callable[[], object]) -> int:
    """The most bytes torch's CPU allocator held at once for tensors made during `fn`."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held = peak = 0
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("name", IN_PLACE)
def test_working_memory_is_a_fraction_of_a_chunk(name: str) -> None:
    """A SmolLM2-135M chunk (30 layers, 256 tokens, 5.9 MB): encoding it whole took 3.6 MB (int8) and 8.8 MB
    (fp8) of temporaries, decoding it 6.1 and 9.8 MB; in place, the temporaries of a few layers at a time."""
    codec = get_codec(name)
    layout = KVLayout(30, 3, 64, torch.bfloat16)
    x = synthetic_kv(layers=30, tokens=256, heads=3, head_dim=64)
    chunk_bytes = x.numel() * x.element_size()
    page = torch.empty(codec.max_encoded_size(layout, 256), dtype=torch.uint8)
    size = codec.encode_into(x, lambda n: page[:n], KEY)
    out = torch.empty_like(x)
    assert peak_allocated(lambda: codec.encode_into(x, lambda n: page[:n], KEY)) < chunk_bytes // 4
    assert peak_allocated(lambda: codec.decode_into(memoryview(page[:size].numpy()), out, KEY)) < chunk_bytes // 4
    assert peak_allocated(lambda: codec.encode(x, KEY)) > chunk_bytes // 4  # the measure sees whole-chunk codes
