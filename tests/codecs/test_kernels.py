"""The int8 codec's compiled loops against torch doing the same arithmetic step by step: grid parameters,
codes and decoded values the same bit for bit, for every element type and for chunks read where they are
(slices of a larger KV cache, heads not back to back)."""

from __future__ import annotations

import subprocess
import sys

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from nencache.codecs import get_codec, kernels
from nencache.codecs.common import affine_params
from nencache.errors import LayoutError

from tests.codecs.helpers import DTYPES, synthetic_kv

LEVELS = 255


def torch_fp16_params(lo: torch.Tensor, hi: torch.Tensor, bf16_step: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp16 (min, step) covering [lo, hi], min rounded down and step up by one ulp at most, in torch ops;
    None unless every group fits fp16 at least as finely as bf16."""
    f16 = torch.float16
    low = lo.to(f16)
    low = torch.where(low.float() > lo, low.nextafter(low.new_full((), float("-inf"))), low)
    step = ((hi - low.float()) / LEVELS).to(f16)
    short = low.float() + LEVELS * step.float() < hi
    step = torch.where(short, step.nextafter(step.new_full((), float("inf"))), step)
    lowf, stepf = low.float(), step.float()
    fits = (torch.isfinite(lowf) & torch.isfinite(stepf) & (stepf > 0) & (lowf <= lo)
            & (lowf + LEVELS * stepf >= hi) & (stepf <= bf16_step.float()))
    return (low, step) if bool(fits.all()) else None


def torch_encode_parts(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """int8's grid parameters and codes of `x`, in torch ops."""
    keys, values = x[:, 0], x[:, 1]
    lo = torch.cat([keys.amin(1).float().reshape(-1), values.amin(-1).float().reshape(-1)])
    hi = torch.cat([keys.amax(1).float().reshape(-1), values.amax(-1).float().reshape(-1)])
    low, step = affine_params(lo, hi, LEVELS)
    fp16 = torch_fp16_params(lo, hi, step)
    if fp16 is not None:
        low, step = fp16
    layers, _, tokens, heads, head_dim = x.shape
    split = layers * heads * head_dim
    inv = step.float().reciprocal()
    bias = -low.float() * inv
    key_codes = torch.addcmul(bias[:split].view(layers, 1, heads, head_dim), keys.float(),
                              inv[:split].view(layers, 1, heads, head_dim))
    val_codes = torch.addcmul(bias[split:].view(layers, tokens, heads, 1), values.float(),
                              inv[split:].view(layers, tokens, heads, 1))
    codes = torch.stack([key_codes, val_codes], 1).round_().clamp_(0, LEVELS).to(torch.uint8)
    return [low, step], codes


def groups(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ranges over many magnitudes: ordinary, tiny (subnormal fp16 steps), constant, beyond fp16."""
    count = draw(st.integers(1, 40))
    scale = draw(st.sampled_from([1e-9, 1e-5, 1e-2, 1.0, 30.0, 6e4, 1e6]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(count, generator=gen) * scale
    b = a + torch.rand(count, generator=gen) * scale * draw(st.sampled_from([0.0, 1e-3, 1.0, 4.0]))
    return a, b


@settings(max_examples=300, deadline=None)
@given(st.composite(groups)())
def test_grid_params_are_torchs_bit_for_bit(lo_hi: tuple[torch.Tensor, torch.Tensor]) -> None:
    lo, hi = lo_hi
    (low, step), fp16 = kernels.grid_params(lo, hi, LEVELS)
    ref_low, ref_step = affine_params(lo, hi, LEVELS)
    assert torch.equal(low.view(torch.int16), ref_low.view(torch.int16))
    assert torch.equal(step.view(torch.int16), ref_step.view(torch.int16))
    ref16 = torch_fp16_params(lo, hi, ref_step)
    assert (fp16 is None) == (ref16 is None)
    if fp16 is not None and ref16 is not None:
        assert torch.equal(fp16[0].view(torch.int16), ref16[0].view(torch.int16))
        assert torch.equal(fp16[1].view(torch.int16), ref16[1].view(torch.int16))


def layouts(dtype: torch.dtype, seed: int) -> list[tuple[str, torch.Tensor]]:
    """One chunk as an engine hands it over: contiguous, a token slice of a larger cache, heads apart."""
    whole = synthetic_kv(layers=3, tokens=80, heads=2, head_dim=16, dtype=dtype, seed=seed)
    chunk = whole[:, :, 16:48]
    apart = chunk.transpose(3, 4).contiguous().transpose(3, 4)  # each head's values are strided
    return [("contiguous", chunk.contiguous()), ("token slice", chunk), ("heads apart", apart)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_codes_and_decoded_values_are_torchs_bit_for_bit(dtype: torch.dtype, seed: int) -> None:
    codec = get_codec("int8")
    for label, x in layouts(dtype, seed):
        head, param, write = codec.encode_parts(x)
        codes = torch.empty(x.shape, dtype=torch.uint8)
        write(codes)
        ref_params, ref_codes = torch_encode_parts(x)
        assert torch.equal(codes, ref_codes), label
        low = torch.cat([head[0].reshape(-1), head[2].reshape(-1)])
        assert torch.equal(low.view(torch.int16), ref_params[0].view(torch.int16)), label
        blob = codec.encode(x)
        for name, out in layouts(dtype, seed + 10):
            out.zero_()
            codec.decode_into(blob, out)
            klo, kst, vlo, vst = (t.float() for t in head)
            expected = torch.stack([
                torch.addcmul(klo[:, None], codes[:, 0], kst[:, None]),
                torch.addcmul(vlo[..., None], codes[:, 1], vst[..., None])], 1).to(dtype)
            assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               expected.view(torch.int16 if dtype != torch.float32 else torch.int32)), (label, name)


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_non_finite_value_anywhere_is_refused(name: str, bad: float, dtype: torch.dtype) -> None:
    codec = get_codec(name)
    for where in [(0, 0, 0, 0, 0), (2, 1, 31, 1, 15), (1, 0, 7, 1, 3)]:
        x = synthetic_kv(layers=3, tokens=32, heads=2, head_dim=16, dtype=dtype)
        x[where] = bad
        with pytest.raises(LayoutError, match="NaN or inf"):
            codec.encode(x)


def test_values_beyond_fp32_scaling_are_refused() -> None:
    x = synthetic_kv(layers=1, tokens=8, heads=1, head_dim=4, dtype=torch.float32)
    x[0, 1, 0, 0, 0], x[0, 1, 0, 0, 1] = -3.0e38, 3.0e38
    with pytest.raises(LayoutError, match="more than fp32 can scale"):
        get_codec("int8").encode(x)


def test_importing_nencache_and_its_codecs_does_not_import_numba() -> None:
    code = "import sys, nencache, nencache.codecs, nencache.codecs.kernels; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(("codec", "dtype", "compiled"),
                         [("int8", "float16", "uint16"), ("int4", "bfloat16", "int16"), ("fp8", "float32", "float32")])
def test_a_cache_prepares_its_codecs_loops_at_start_up_for_its_own_dtype_only(codec: str, dtype: str,
                                                                               compiled: str) -> None:
    """fp16 elements are seen as uint16 patterns, bf16 ones as int16: only the layout's type is compiled."""
    code = f"""
import sys, torch
from nencache.cache import KVCache
from nencache.config import CacheConfig
from nencache.layout import KVLayout
layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.{dtype})
config = CacheConfig(chunk_size=4, cpu_size=1 << 20, cpu_codec="{codec}", pin_memory=False)
with KVCache(config, layout, "m") as cache:
    cache._prefault.join()  # the start-up work: the codec's warm-up, then the pool's pages
    loops = sys.modules["nencache.codecs.{codec}_loops"]
    print(sorted(str(signature[0].dtype) for signature in loops.quantize.signatures))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"['{compiled}']"


def test_the_loops_compile_where_numba_has_no_writable_cache_directory() -> None:
    """A read-only install with no writable home: numba refuses every cache directory; the loops still run."""
    code = """
import logging, sys, torch
from numba.core import caching
real = caching._CacheLocator.ensure_cache_path
def refuse(self):
    if "nencache-numba-" not in self.get_cache_path():
        raise PermissionError("read-only")
    real(self)
caching._CacheLocator.ensure_cache_path = refuse
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from nencache.codecs import get_codec
x = torch.randn(2, 2, 8, 1, 16).bfloat16()
for name in ("int8", "int4", "fp8"):
    codec = get_codec(name)
    out = torch.empty_like(x)
    codec.decode_into(codec.encode(x), out)
    print(name, float((out.float() - x.float()).abs().max()) < 0.5)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "numba cannot write its cache" in out and all(f"{name} True" in out for name in ("int8", "int4", "fp8"))
