"""The fp8 codec's loops, compiled by numba (see `nencache.codecs.kernels`, which imports this module on first
use so that importing NenCache never imports numba).

Three loops: each (layer, K/V, head)'s largest magnitude, the codes, and the decoding. `e4m3` is torch's
(c10's) fp32 -> float8_e4m3fn conversion, round to nearest even, step for step; decoding widens a code to
the fp16 value 2**-8 as large (exact), then multiplies by 256 times the scale in fp32, rounded once into the
output's type, as the torch codec does. So blobs and decoded chunks are the same bit for bit.
"""

# mypy: ignore-errors
import numba
import numpy as np

from nencache.codecs.loop_elements import (
    bits_to_f32, f32_to_bits, from_key, half_to_f32, load, magnitude_key, special, store,
)

_SUBNORMAL_BIAS = np.uint32(141 << 23)  # 2**14 as fp32 bits: adding it rounds a value below 2**-6 to e4m3's grid
_SMALLEST_NORMAL = np.uint32(121 << 23)  # 2**-6 as fp32 bits
_REBIAS = np.uint32(0xC4000000)  # (7 - 127) << 23, as uint32: the exponent bias of e4m3 against fp32's


@numba.njit(inline="always")
def e4m3(value):
    """float8_e4m3fn bits of a finite fp32 `value` with |value| <= 448, rounded to nearest even."""
    bits = f32_to_bits(value)
    sign = bits & np.uint32(0x80000000)
    bits ^= sign
    if bits < _SMALLEST_NORMAL:
        out = f32_to_bits(bits_to_f32(bits) + bits_to_f32(_SUBNORMAL_BIAS)) - _SUBNORMAL_BIAS
    else:
        out = (bits + _REBIAS + np.uint32(0x7FFFF) + ((bits >> np.uint32(20)) & np.uint32(1))) >> np.uint32(20)
    return np.uint8((out | (sign >> np.uint32(24))) & np.uint32(0xFF))


@numba.njit(nogil=True, cache=True)
def absmax(x, s_layer, s_kind, s_token, layers, tokens, heads, head_dim, out):
    """The largest magnitude of each (layer, K/V, head) over its tokens and head_dim, as fp32, into `out`
    (`[layers, 2, heads]`, flat); False if there is a NaN or an infinity. Token rows are read in order."""
    bad = np.uint32(0)
    top = np.zeros(heads, np.int32)
    for layer in range(layers):
        for kind in range(2):
            start = layer * s_layer + kind * s_kind
            top[:] = 0
            for t in range(tokens):
                for h in range(heads):
                    at = start + t * s_token + h * head_dim
                    row = x[at:at + head_dim]
                    most = top[h]
                    for d in range(head_dim):
                        bad |= special(row, d)
                        most = max(most, magnitude_key(row, d))
                    top[h] = most
            for h in range(heads):
                out[(layer * 2 + kind) * heads + h] = from_key(x, top[h])
    return bad == 0


@numba.njit(nogil=True, cache=True)
def quantize(x, s_layer, s_kind, s_token, layers, tokens, heads, head_dim, inv, codes):
    """`e4m3(clamp(x * inv, -448, 448))` of every element (`inv` fp32 per (layer, K/V, head)) into the
    contiguous uint8 `codes` (`[layers, 2, tokens, heads, head_dim]`)."""
    top = np.float32(448)
    out = 0
    for layer in range(layers):
        for kind in range(2):
            start = layer * s_layer + kind * s_kind
            scales = inv[(layer * 2 + kind) * heads:(layer * 2 + kind + 1) * heads]
            for t in range(tokens):
                for h in range(heads):
                    at = start + t * s_token + h * head_dim
                    row, dest = x[at:at + head_dim], codes[out:out + head_dim]
                    scale = scales[h]
                    for d in range(head_dim):
                        dest[d] = e4m3(min(max(load(row, d) * scale, -top), top))
                    out += head_dim


@numba.njit(nogil=True, cache=True)
def dequantize(codes, scale, y, s_layer, s_kind, s_token, layers, tokens, heads, head_dim):
    """`fp16(code) * (256 * scale)` in fp32, rounded once into `y`'s type, of every code (`scale` fp32 per
    (layer, K/V, head)). The NaN pattern, never written, reads as a finite 480 * scale."""
    at = 0
    for layer in range(layers):
        for kind in range(2):
            start = layer * s_layer + kind * s_kind
            scales = scale[(layer * 2 + kind) * heads:(layer * 2 + kind + 1) * heads]
            for t in range(tokens):
                for h in range(heads):
                    first = start + t * s_token + h * head_dim
                    row, src = y[first:first + head_dim], codes[at:at + head_dim]
                    factor = scales[h] * np.float32(256)
                    for d in range(head_dim):
                        code = np.uint16(src[d])
                        half = ((code & np.uint16(0x80)) << np.uint16(8)) | ((code & np.uint16(0x7F)) << np.uint16(7))
                        store(row, d, half_to_f32(half) * factor)
                    at += head_dim
