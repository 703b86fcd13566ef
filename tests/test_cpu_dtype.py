"""The model dtype is chosen by what the CPU computes fast: fp32 where bf16 is emulated."""

from __future__ import annotations

import pytest
import torch

from nencache.cpu_dtype import choose_dtype, cpu_flags, matmul_gflops
from nencache.errors import ConfigError

AVX2_ONLY = "processor : 0\nflags : fpu sse sse2 avx avx2 fma f16c\n"
SAPPHIRE_RAPIDS = "processor : 0\nflags : fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor : 0\nFeatures : fp asimd bf16 i8mm sve\n"


def test_flags_are_read_from_cpuinfo_on_x86_and_arm() -> None:
    assert {"avx2", "fma"} <= cpu_flags(AVX2_ONLY) and "avx512_bf16" not in cpu_flags(AVX2_ONLY)
    assert {"avx512_bf16", "amx_bf16"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert "bf16" in cpu_flags(GRAVITON3)
    assert cpu_flags("") == set()


def test_emulated_bf16_picks_fp32_and_says_why() -> None:
    # the figures of a machine without AVX-512: bf16 matmul 0.3 GFLOP/s against 155 for fp32
    speeds = {torch.bfloat16: 0.3, torch.float32: 155.0}
    choice = choose_dtype("auto", cpuinfo=AVX2_ONLY, measure=speeds.__getitem__)
    assert choice.dtype == torch.float32 and choice.name == "fp32"
    assert "emulated" in choice.reason and "517x slower" in choice.reason and "no native bf16 flag" in choice.reason


def test_native_bf16_is_kept() -> None:
    speeds = {torch.bfloat16: 140.0, torch.float32: 60.0}
    choice = choose_dtype("auto", cpuinfo=SAPPHIRE_RAPIDS, measure=speeds.__getitem__)
    assert choice.dtype == torch.bfloat16
    assert "amx_bf16, avx512_bf16" in choice.reason and choice.native_flags == ("amx_bf16", "avx512_bf16")


def test_the_measurement_decides_even_where_the_flags_promise_bf16() -> None:
    # e.g. oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA) on a CPU that has the flag
    speeds = {torch.bfloat16: 2.0, torch.float32: 60.0}
    assert choose_dtype("auto", cpuinfo=SAPPHIRE_RAPIDS, measure=speeds.__getitem__).dtype == torch.float32


def test_an_explicit_dtype_is_obeyed_and_a_bad_one_refused() -> None:
    assert choose_dtype("fp32").dtype == torch.float32 and choose_dtype("bf16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="use auto, bf16 or fp32"):
        choose_dtype("fp8")


def test_this_machines_matmul_is_measured_in_gflops() -> None:
    assert matmul_gflops(torch.float32, side=64, seconds=0.005) > 0.01
    choice = choose_dtype("auto")
    assert choice.bf16_gflops is not None and choice.fp32_gflops is not None and choice.reason
