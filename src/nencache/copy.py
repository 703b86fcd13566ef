"""`copy_into`: the one way KV bytes are copied between the pool and an engine's tensors.

On CPU it copies through numpy: a plain single-threaded memcpy-speed loop that releases the GIL.
torch's own CPU `copy_` splits every copy over its OpenMP threads, and on a busy machine that
barrier costs more than the copy itself (measured here: 0.6 GB/s instead of 8 GB/s). Copies that
touch a GPU go through torch, which uses the DMA engines.
"""

from __future__ import annotations

import numpy as np
import torch

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SMALL = 1 << 16  # bytes: below torch's parallel grain, its copy_ runs on this thread, without numpy's set-up cost


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


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst[...] = src` for tensors of one shape and dtype, any strides, any devices."""
    if dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype:
        assert dst.shape == src.shape, f"copy of {tuple(src.shape)} into {tuple(dst.shape)}"
        if dst.dim() == 0 or dst.numel() * dst.element_size() <= _SMALL:  # small chunks: ~1 us instead of ~15
            dst.copy_(src)
            return
        target, source = coalesce(as_numpy(dst), as_numpy(src))
        np.copyto(target, source, casting="no")
    else:
        dst.copy_(src, non_blocking=dst.device.type == "cuda" and src.is_pinned())
