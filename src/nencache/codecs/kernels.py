"""Fused loops of the int8, int4 and fp8 codecs, compiled by numba: a chunk's ranges, codes and decoding.

torch runs each step of a quantizer as its own pass over the chunk (convert to fp32, multiply-add,
round, clamp, narrow), each with a chunk-sized or layer-sized temporary; these loops read the chunk
once per step they need (ranges, then codes) and write the result in place, at memory speed. They
release the GIL and run on one core each, so several chunks encode or decode at once on the store's
threads. `benchmarks/RESULTS.md` has their speeds ("codecs: encode and decode speed"), and beside
torch's ("compare trees: codec_speed.py").

A chunk is `[layers, 2, tokens, kv_heads, head_dim]` with each token's heads and head_dims back to back
(any strides for layers, keys/values and tokens: a slice of an engine's KV cache is read where it is).
Elements are fp32, or fp16/bf16 handled as their 16-bit patterns (numba has no bf16 type, and no fp16
arrays); the arithmetic is the torch codec's, operation for operation (fp32 fused multiply-add for the
codes, `low + step * code` rounded once for the decoded values), so blobs and decoded chunks are the
same bit for bit.

The int4 functions (`grouped_ranges`, `quantize_packed`, `dequantize_packed`) take the int4 codec's groups
(keys over `key_group` tokens, values over `value_group` channels) and its codes packed two a byte; the fp8
ones (`fp8_absmax`, `fp8_quantize`, `fp8_dequantize`) one scale per layer, K/V and head.

numba is imported on first use and the loops are compiled for each element type then, and cached on disk
(numba's `cache=True`; where numba finds no writable place for that cache, in a private temporary directory
instead, so such a process compiles them afresh): nothing happens at import. The one difference from torch: a
value group holding zeros of both signs gets -0 as its minimum and +0 as its maximum (torch's amin/amax return
either).
"""

from __future__ import annotations

import importlib
import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nencache.errors import LayoutError

_BITS = {torch.bfloat16: np.int16, torch.float16: np.uint16}  # 16-bit types seen as patterns, told apart by sign
log = logging.getLogger("nencache.codecs")
_lock = threading.Lock()
_LOOPS: dict[str, Any] = {}


@dataclass(frozen=True, slots=True)
class FlatChunk:
    """A chunk tensor as numba sees it: its storage as one flat array and where each part starts.

    Element `[l, kind, t, h, d]` is `data[l * layer + kind * kind_stride + t * token + h * head_dim + d]`.
    """

    data: np.ndarray
    layer: int
    kind_stride: int
    token: int
    shape: tuple[int, int, int, int, int]


def supports(tensor: torch.Tensor) -> bool:
    """Whether the loops take `tensor`: a CPU fp32/fp16/bf16 chunk whose heads and head_dims are back to back."""
    if tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    _, _, _, heads, head_dim = tensor.shape
    return (tensor.stride(4) == 1 or head_dim == 1) and (tensor.stride(3) == head_dim or heads == 1)


def flat(tensor: torch.Tensor) -> FlatChunk:
    """`tensor` (see `supports`) as a `FlatChunk` over its own storage (no copy: writes land in it)."""
    if not supports(tensor):
        raise LayoutError(f"the codecs' loops take CPU fp32/fp16/bf16 chunks with heads and head_dims back to back, "
                          f"got {tensor.dtype} on {tensor.device} with strides {tensor.stride()}")
    layers, _, tokens, heads, head_dim = tensor.shape
    strides = [tensor.stride(i) if tensor.shape[i] > 1 else 0 for i in range(3)]
    span = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, (*strides, head_dim, 1)) if n > 0)
    if tensor.numel() == 0:
        span = 0
    storage = tensor.as_strided((span,), (1,), tensor.storage_offset())
    bits = _BITS.get(tensor.dtype)
    data = storage.numpy() if bits is None else storage.view(torch.int16).numpy().view(bits)
    return FlatChunk(data, strides[0], strides[1], strides[2], (layers, 2, tokens, heads, head_dim))


def readable(chunk: torch.Tensor) -> FlatChunk:
    """`chunk` as the loops read it: where it is if `supports` takes it, else a contiguous copy."""
    return flat(chunk if supports(chunk) else chunk.contiguous())


def decode_to(out: torch.Tensor, decode: Callable[[FlatChunk], None]) -> None:
    """Run `decode` on `out` where the loops can write it as it is, else on a contiguous tensor of its shape and
    dtype that is then copied into `out`."""
    if supports(out):
        decode(flat(out))
        return
    target = torch.empty(out.shape, dtype=out.dtype)
    decode(flat(target))
    out.copy_(target)


def ranges(chunk: FlatChunk) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp32 min and max of each int8 group: the key channels over the tokens (`[layers, heads, head_dim]`), then
    the value tokens and heads over head_dim (`[layers, tokens, heads]`), flat; None if the chunk holds a NaN
    or an infinity."""
    _, _, tokens, _, head_dim = chunk.shape
    return grouped_ranges(chunk, tokens, head_dim)  # one key group of every token, one value group per head


def grid_params(lo: torch.Tensor, hi: torch.Tensor, levels: int
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """Each group's grid `(min, step)` covering fp32 `[lo, hi]` (1-D) in `levels` steps: bf16 (min rounded
    down, step up: `nencache.codecs.common.affine_params`), and fp16 rounded the same way, or None where fp16
    cannot hold some group at least as finely as bf16 (out of range, subnormal step, constant group)."""
    count = lo.numel()
    low_bf, step_bf = torch.empty(count, dtype=torch.bfloat16), torch.empty(count, dtype=torch.bfloat16)
    low_h, step_h = torch.empty(count, dtype=torch.float16), torch.empty(count, dtype=torch.float16)
    finite, fits = _loops("loop_elements").grid_params(
        _f32(lo), _f32(hi), np.float32(levels), *(t.view(torch.int16).numpy().view(np.uint16)
                                                  for t in (low_bf, step_bf, low_h, step_h)))
    if not finite:
        raise LayoutError("chunk values span more than fp32 can scale; use the raw codec for this chunk")
    return (low_bf, step_bf), ((low_h, step_h) if fits else None)


def quantize(chunk: FlatChunk, key_bias: torch.Tensor, key_inv: torch.Tensor, val_bias: torch.Tensor,
             val_inv: torch.Tensor, levels: int, codes: torch.Tensor) -> None:
    """Write `clamp(rint(fma(x, inv, bias)), 0, levels)` of every element into the contiguous uint8 `codes`
    (`[layers, 2, tokens, heads, head_dim]`): `inv`/`bias` fp32 per key channel `[layers, heads, head_dim]`
    and per value token and head `[layers, tokens, heads]`."""
    layers, _, tokens, heads, head_dim = chunk.shape
    _loops("int8_loops").quantize(chunk.data, chunk.layer, chunk.kind_stride, chunk.token, layers, tokens, heads,
                        head_dim, _f32(key_bias), _f32(key_inv), _f32(val_bias), _f32(val_inv), np.float32(levels),
                        codes.view(-1).numpy())


def dequantize(codes: torch.Tensor, key_low: torch.Tensor, key_step: torch.Tensor, val_low: torch.Tensor,
               val_step: torch.Tensor, out: FlatChunk) -> None:
    """Write `low + step * code` (fp32, rounded once into `out`'s type) of contiguous uint8 `codes` into `out`;
    `low`/`step` fp32 per key channel `[layers, heads, head_dim]` and per value token and head
    `[layers, tokens, heads]`."""
    layers, _, tokens, heads, head_dim = out.shape
    _loops("int8_loops").dequantize(codes.reshape(-1).numpy(), _f32(key_low), _f32(key_step), _f32(val_low),
                                    _f32(val_step), out.data, out.layer, out.kind_stride, out.token, layers, tokens,
                                    heads, head_dim)


def grouped_ranges(chunk: FlatChunk, key_group: int, value_group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp32 min and max of each int4 group: the key channels over each `key_group` tokens (`[layers, key groups,
    heads, head_dim]`, the last group possibly short), then the value tokens and heads over each `value_group`
    channels (`[layers, tokens, heads, head_dim / value_group]`), flat; None if the chunk holds a NaN or an
    infinity."""
    layers, _, tokens, heads, head_dim = chunk.shape
    split = layers * -(-tokens // key_group) * heads * head_dim
    lo = np.empty(split + layers * tokens * heads * (head_dim // value_group), np.float32)
    hi = np.empty_like(lo)
    finite = _loops("loop_elements").ranges(chunk.data, chunk.layer, chunk.kind_stride, chunk.token, layers, tokens,
                                         heads, head_dim, key_group, value_group, lo[:split], hi[:split], lo[split:],
                                         hi[split:])
    return (torch.from_numpy(lo), torch.from_numpy(hi)) if finite else None


def quantize_packed(chunk: FlatChunk, key_group: int, value_group: int, key_bias: torch.Tensor, key_inv: torch.Tensor,
                    val_bias: torch.Tensor, val_inv: torch.Tensor, levels: int, codes: torch.Tensor) -> None:
    """Write `clamp(rint(fma(x, inv, bias)), 0, levels)` (levels < 16) of every element, packed two a byte along
    head_dim, into the contiguous uint8 `codes` (`[layers, 2, tokens, heads, ceil(head_dim / 2)]`); `inv`/`bias`
    fp32 per group, in `grouped_ranges`'s order."""
    layers, _, tokens, heads, head_dim = chunk.shape
    _loops("int4_loops").quantize(chunk.data, chunk.layer, chunk.kind_stride, chunk.token, layers, tokens, heads,
                                  head_dim, key_group, value_group, _f32(key_bias), _f32(key_inv), _f32(val_bias),
                                  _f32(val_inv), np.float32(levels), codes.view(-1).numpy())


def dequantize_packed(codes: torch.Tensor, key_group: int, value_group: int, key_low: torch.Tensor,
                      key_step: torch.Tensor, val_low: torch.Tensor, val_step: torch.Tensor, out: FlatChunk) -> None:
    """Write `low + step * code` (fp32, rounded once into `out`'s type) of contiguous packed `codes` into `out`;
    `low`/`step` per group, in `grouped_ranges`'s order."""
    layers, _, tokens, heads, head_dim = out.shape
    _loops("int4_loops").dequantize(codes.reshape(-1).numpy(), key_group, value_group, _f32(key_low),
                                    _f32(key_step), _f32(val_low), _f32(val_step), out.data, out.layer,
                                    out.kind_stride, out.token, layers, tokens, heads, head_dim)


def fp8_absmax(chunk: FlatChunk) -> torch.Tensor | None:
    """The largest magnitude of each (layer, K/V, head) over its tokens and head_dim, fp32 `[layers, 2, heads]`;
    None if the chunk holds a NaN or an infinity."""
    layers, _, tokens, heads, head_dim = chunk.shape
    out = np.empty(layers * 2 * heads, np.float32)
    finite = _loops("fp8_loops").absmax(chunk.data, chunk.layer, chunk.kind_stride, chunk.token, layers, tokens,
                                        heads, head_dim, out)
    return torch.from_numpy(out).view(layers, 2, heads) if finite else None


def fp8_quantize(chunk: FlatChunk, inv: torch.Tensor, codes: torch.Tensor) -> None:
    """Write the float8_e4m3fn bits of `clamp(x * inv, -448, 448)` (`inv` fp32 per (layer, K/V, head)) of every
    element into the contiguous uint8 `codes` (`[layers, 2, tokens, heads, head_dim]`)."""
    layers, _, tokens, heads, head_dim = chunk.shape
    _loops("fp8_loops").quantize(chunk.data, chunk.layer, chunk.kind_stride, chunk.token, layers, tokens, heads,
                                 head_dim, _f32(inv), codes.view(-1).numpy())


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor, out: FlatChunk) -> None:
    """Write `float(code) * scale` (fp32, rounded once into `out`'s type) of contiguous e4m3 `codes` into `out`;
    `scale` fp32 per (layer, K/V, head)."""
    layers, _, tokens, heads, head_dim = out.shape
    _loops("fp8_loops").dequantize(codes.reshape(-1).numpy(), _f32(scale), out.data, out.layer, out.kind_stride,
                                   out.token, layers, tokens, heads, head_dim)


def _f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().contiguous().reshape(-1).numpy()


def _loops(name: str) -> Any:
    """A module of compiled loops (`nencache.codecs.<name>`), imported (with numba) on first use."""
    module = _LOOPS.get(name)
    if module is None:
        with _lock:
            module = _LOOPS.get(name)
            if module is None:
                module = _LOOPS[name] = _import(f"nencache.codecs.{name}")
    return module


def _import(module: str) -> Any:
    """Import `module`. numba refuses to define a cached function when neither its package's directory, nor
    NUMBA_CACHE_DIR, nor the user's cache directory can be written (a read-only install run by a user without
    a home, say); the loops then get a private temporary cache directory: compiled afresh in this process."""
    try:
        return importlib.import_module(module)
    except RuntimeError as exc:
        if "cannot cache function" not in str(exc):
            raise
    numba = importlib.import_module("numba")
    numba.config.CACHE_DIR = tempfile.mkdtemp(prefix="nencache-numba-")
    log.warning("numba cannot write its cache of compiled code anywhere (set NUMBA_CACHE_DIR to a writable "
                "directory to keep it between runs); the codec loops are compiled into %s for this process",
                numba.config.CACHE_DIR)
    return importlib.import_module(module)
