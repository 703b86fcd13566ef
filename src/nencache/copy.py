"""`copy_into`: the one way KV bytes are copied between the pool and an engine's tensors.

On CPU it copies through numpy: a plain single-threaded memcpy-speed loop that releases the GIL.
torch's own CPU `copy_` splits every copy over its OpenMP threads, and on a busy machine that
barrier costs more than the copy itself (measured here: 0.6 GB/s instead of 8 GB/s). Copies that
touch a GPU go through torch, which uses the DMA engines.

A small chunk between contiguous CPU tensors is one `memmove`: torch's `copy_` runs several
microseconds of set-up code for it, which after an engine's forward pass is cold in the CPU's caches
(benchmarks/RESULTS.md, "latency: the CPU tier's small-chunk read").
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SMALL = 1 << 16  # bytes: below torch's parallel grain, a copy is short enough to run on the calling thread
_memmove = ctypes.memmove


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (bf16/fp16/fp8 viewed as integers of the same width)."""
    if tensor.dtype in (torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        return tensor.detach().numpy()
    return tensor.detach().view(_SAME_SIZE_INT[tensor.element_size()]).numpy()


def coalesce(dst: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same two arrays with adjacent dimensions merged wherever both lay them out contiguously.

    A chunk slice `[layers, 2, tokens, heads, dim]` of a larger KV tensor becomes `[layers * 2, tokens
    * heads * dim]`: a few long rows, which numpy copies at memcpy speed.
    """
    shape, dst_strides, src_strides = [dst.shape[-1]], [dst.strides[-1]], [src.strides[-1]]
    for size, d_stride, s_stride in zip(dst.shape[-2::-1], dst.strides[-2::-1], src.strides[-2::-1]):
        if d_stride == dst_strides[0] * shape[0] and s_stride == src_strides[0] * shape[0]:
            shape[0] *= size
        else:
            shape.insert(0, size)
            dst_strides.insert(0, d_stride)
            src_strides.insert(0, s_stride)
    return (np.lib.stride_tricks.as_strided(dst, shape, dst_strides),
            np.lib.stride_tricks.as_strided(src, shape, src_strides, writeable=False))


class SmallCopier:
    """Copies small chunks, held as byte views, into contiguous CPU tensors of their shape and dtype.

    After an engine's forward pass the code of torch's `copy_` and of a ctypes call is cold in the
    CPU's caches, and runs several times longer than an 8 KiB copy (benchmarks/RESULTS.md, "latency:
    the CPU tier's small-chunk read"). Here the copy is a memoryview slice assignment, into a byte view
    of the destination's memory made once per address and reused. A view borrows its memory: it is
    written through only right after the destination tensor was checked to start at that address and
    to span that many bytes.
    """

    __slots__ = ("_targets", "_limit")

    def __init__(self, limit: int = 4096) -> None:
        self._targets: dict[int, memoryview] = {}
        self._limit = limit  # distinct destination addresses kept; past it the views are made afresh

    def copy(self, dst: torch.Tensor, dtype: torch.dtype, shape: torch.Size, source: memoryview) -> bool:
        """Copy `source` (the bytes of a contiguous tensor of `shape` and `dtype`) into `dst`; False, with
        nothing copied, when `dst` is not a contiguous CPU tensor of that shape and dtype."""
        if not (dst.is_cpu and dst.dtype == dtype and dst.shape == shape and dst.is_contiguous()):
            return False
        address = dst.data_ptr()
        target = self._targets.get(address)
        if target is None or len(target) != len(source):
            if len(self._targets) >= self._limit:
                self._targets.clear()
            target = memoryview((ctypes.c_char * len(source)).from_address(address)).cast("B")
            self._targets[address] = target
        target[:] = source
        return True


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst[...] = src` for tensors of one shape and dtype, any strides, any devices."""
    if dst.is_cpu and src.is_cpu and dst.dtype == src.dtype:
        assert dst.shape == src.shape, f"copy of {tuple(src.shape)} into {tuple(dst.shape)}"
        nbytes = dst.nbytes
        if nbytes <= _SMALL:
            if dst.is_contiguous() and src.is_contiguous():
                _memmove(dst.data_ptr(), src.data_ptr(), nbytes)
            else:
                dst.copy_(src)
            return
        target, source = coalesce(as_numpy(dst), as_numpy(src))
        np.copyto(target, source, casting="no")
    else:
        dst.copy_(src, non_blocking=dst.device.type == "cuda" and src.is_pinned())
