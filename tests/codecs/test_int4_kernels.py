"""The int4 codec's compiled loops against torch doing the same arithmetic step by step (`int4_reference`):
payload sections and decoded values the same bit for bit, for every element type, every kind of group
(whole chunk or groups, even and odd head_dims and value groups, a short last key group), exact tokens, and
chunks read or written where they are (slices of a larger KV cache, heads not back to back)."""

from __future__ import annotations

import pytest
import torch

from nencache.codecs import get_codec
from nencache.codecs.common import read_sections
from nencache.errors import LayoutError
from nencache.format import split_blob

from tests.codecs import int4_reference as reference
from tests.codecs.helpers import DTYPES, engine_layouts, same_bits, synthetic_kv

# (key_group, value_group, exact_tokens, head_dim): the defaults, groups, a short last key group, odd value
# groups (the scratch-row path), an odd head_dim, no exact tokens, every token exact
SETTINGS = [(0, 0, 1, 16), (8, 8, 1, 16), (5, 4, 2, 16), (0, 3, 1, 12), (7, 0, 1, 15), (0, 0, 0, 16),
            (0, 0, 40, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_sections_and_decoded_values_are_torchs_bit_for_bit(dtype: torch.dtype,
                                                             setting: tuple[int, int, int, int]) -> None:
    key_group, value_group, exact, head_dim = setting
    codec = get_codec("int4", key_group=key_group, value_group=value_group, exact_tokens=exact)
    x = synthetic_kv(layers=3, tokens=33, heads=2, head_dim=head_dim, dtype=dtype, seed=head_dim + exact)
    expected = reference.encode(x, key_group, value_group, exact)
    decoded = reference.decode(expected, 33, key_group, value_group, exact)
    for label, chunk in engine_layouts(x):
        blob = codec.encode(chunk)
        header, payload = split_blob(blob)
        spec = codec.payload_spec(x.shape, dtype)
        for got, want in zip(read_sections(payload, spec), expected, strict=True):
            assert same_bits(got, want), label
        for name, out in engine_layouts(torch.full_like(x, 3.0)):
            codec.decode_into(blob, out)
            assert same_bits(out.contiguous(), decoded), (label, name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_non_finite_value_anywhere_past_the_exact_tokens_is_refused(bad: float, dtype: torch.dtype) -> None:
    codec = get_codec("int4", value_group=8)
    for where in [(0, 0, 1, 0, 0), (2, 1, 31, 1, 15), (1, 0, 7, 1, 3), (1, 1, 9, 0, 8)]:
        x = synthetic_kv(layers=3, tokens=32, heads=2, head_dim=16, dtype=dtype)
        x[where] = bad
        with pytest.raises(LayoutError, match="NaN or inf"):
            codec.encode(x)
