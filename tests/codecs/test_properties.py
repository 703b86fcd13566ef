"""Property tests over chunk shapes: any geometry and token count round-trips within its bounds."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nencache.codecs.vq_codebook import CodebookStore
from nencache.layout import KVLayout

from tests.codecs.helpers import ALL, DTYPES, LOSSLESS, affine_bound, base_of, make_codec, synthetic_kv

_CODECS = {name: make_codec(name) for name in ALL}  # vq ones learn a codebook per new geometry
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.tuples(
    st.integers(1, 4),     # layers
    st.integers(1, 300),   # tokens
    st.integers(1, 4),     # kv heads
    st.integers(1, 130),   # head_dim (odd ones included)
)


@_SETTINGS
@given(name=st.sampled_from(ALL), shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_round_trip_any_shape(name: str, shape: tuple[int, int, int, int], dtype: torch.dtype, seed: int) -> None:
    layers, tokens, heads, head_dim = shape
    codec = _CODECS[name]
    x = synthetic_kv(layers, tokens, heads, head_dim, dtype, seed)
    blob = codec.encode(x)
    assert len(blob) <= codec.max_encoded_size(KVLayout(layers, heads, head_dim, dtype), tokens)
    y = codec.decode(blob)
    assert y.shape == x.shape and y.dtype == dtype
    base = base_of(name)
    if name in LOSSLESS:
        assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))
    elif base in ("int8", "int4"):
        assert ((y.double() - x.double()).abs() <= affine_bound(x, 255 if base == "int8" else 15)).all()
    elif base == "fp8":
        scale = x.double().abs().amax(dim=(2, 4), keepdim=True) / 448
        assert ((y.double() - x.double()).abs() <= x.double().abs() * (2**-4 + 2**-7) + scale * 2**-9).all()
    else:  # vq: every value stays inside its group's grid, so the error is at most the group's range
        assert ((y.double() - x.double()).abs() <= affine_bound(x, 1) * 2).all()


@_SETTINGS
@given(name=st.sampled_from(["int8", "fp8", "int4", "vq"]), shape=shapes, seed=st.integers(0, 2**16))
def test_quantizer_size_is_exact_and_encoding_deterministic(name: str, shape: tuple[int, int, int, int],
                                                            seed: int) -> None:
    layers, tokens, heads, head_dim = shape
    codec = _CODECS[name]
    x = synthetic_kv(layers, tokens, heads, head_dim, torch.bfloat16, seed)
    if name == "vq":
        codec = make_codec("vq")
        codec.store = CodebookStore()
        if tokens > codec.exact_tokens:
            codec.calibrate([x])
    blob = codec.encode(x)
    assert len(blob) == codec.max_encoded_size(KVLayout(layers, heads, head_dim), tokens)
    assert codec.encode(x) == blob
