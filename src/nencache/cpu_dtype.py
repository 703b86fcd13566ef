"""Which float dtype a model runs fastest in on this machine: bf16 where the hardware does it, else fp32.

A CPU without native bf16 arithmetic (no AVX512_BF16 or AMX on x86) runs bf16 matrix products
through slow conversions: on such machines a bf16 matmul reaches 1-2% of fp32's speed, and a prefill
of a few thousand tokens takes tens of seconds instead of one. The choice is made by timing one small
bf16 and one fp32 matrix product (about 50 ms); the CPU's flags are read to explain it.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 / AMX, and Arm's `bf16` feature
BF16_MIN_SHARE = 0.5  # bf16 is chosen when its matmul reaches at least this share of fp32's speed
_SIDE = 128


@dataclass(slots=True, frozen=True)
class DtypeChoice:
    """The chosen dtype and why, with the figures behind it."""

    dtype: torch.dtype
    reason: str
    bf16_gflops: float | None = None
    fp32_gflops: float | None = None
    native_flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo; empty where unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def matmul_gflops(dtype: torch.dtype, side: int = _SIDE, seconds: float = 0.02) -> float:
    """GFLOP/s of a `side` x `side` matrix product in `dtype` on one thread, timed for about `seconds`."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(side, side, generator=generator).to(dtype)
    b = torch.randn(side, side, generator=generator).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a @ b  # first-call costs (kernel selection) off the clock
        count, started = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
    finally:
        torch.set_num_threads(threads)
    return 2 * side**3 * count / elapsed / 1e9


def choose_dtype(requested: str = "auto", *, cpuinfo: str | None = None,
                 measure: Callable[[torch.dtype], float] = matmul_gflops) -> DtypeChoice:
    """`bf16` or `fp32` as asked, or, for `auto`, the faster of the two here (see the module docstring)."""
    wanted = requested.strip().lower()
    if wanted in ("bf16", "bfloat16"):
        return DtypeChoice(torch.bfloat16, "asked for bf16")
    if wanted in ("fp32", "float32"):
        return DtypeChoice(torch.float32, "asked for fp32")
    if wanted != "auto":
        from nencache.errors import ConfigError

        raise ConfigError(f"dtype {requested!r}: use auto, bf16 or fp32")
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return DtypeChoice(torch.bfloat16, f"the GPU ({torch.cuda.get_device_name()}) computes in bf16 natively")
    native = tuple(sorted(cpu_flags(cpuinfo) & set(NATIVE_BF16_FLAGS)))
    bf16, fp32 = measure(torch.bfloat16), measure(torch.float32)
    flags = f"CPU flags: {', '.join(native)}" if native else f"no native bf16 flag on this {platform.machine()} CPU"
    figures = f"bf16 matmul {bf16:.1f} GFLOP/s, fp32 {fp32:.1f} GFLOP/s; {flags}"
    if bf16 >= BF16_MIN_SHARE * fp32:
        return DtypeChoice(torch.bfloat16, f"bf16 runs at full speed here ({figures})", bf16, fp32, native)
    return DtypeChoice(torch.float32, f"bf16 is emulated here, {fp32 / max(bf16, 1e-9):.0f}x slower than fp32 "
                                      f"({figures})", bf16, fp32, native)
