"""The int8 codec's codes and decoding, compiled by numba (see `nencache.codecs.kernels`, which imports this
module on first use so that importing NenCache never imports numba).

Two loops, codes and decoding; element access and the groups' ranges are `nencache.codecs.loop_elements`. Each
writes what `kernels` describes; the arithmetic is the torch codec's, so results are the same bit for bit.
"""

# mypy: ignore-errors
import numba
import numpy as np

from nencache.codecs.loop_elements import fma, load, store


@numba.njit(nogil=True, cache=True)
def quantize(x, s_layer, s_kind, s_token, layers, tokens, heads, head_dim,
             key_bias, key_inv, val_bias, val_inv, levels, codes):
    width = heads * head_dim
    zero = np.float32(0)
    out = 0
    for layer in range(layers):
        start = layer * s_layer
        inv, bias = key_inv[layer * width:(layer + 1) * width], key_bias[layer * width:(layer + 1) * width]
        for t in range(tokens):
            row, dest = x[start + t * s_token:start + t * s_token + width], codes[out:out + width]
            for c in range(width):
                q = np.rint(fma(load(row, c), inv[c], bias[c]))
                dest[c] = np.uint8(min(max(q, zero), levels))
            out += width
        start += s_kind
        for t in range(tokens):
            for h in range(heads):
                at = start + t * s_token + h * head_dim
                row, dest = x[at:at + head_dim], codes[out:out + head_dim]
                group = (layer * tokens + t) * heads + h
                scale, shift = val_inv[group], val_bias[group]
                for d in range(head_dim):
                    q = np.rint(fma(load(row, d), scale, shift))
                    dest[d] = np.uint8(min(max(q, zero), levels))
                out += head_dim


@numba.njit(nogil=True, cache=True)
def dequantize(codes, key_low, key_step, val_low, val_step,
               y, s_layer, s_kind, s_token, layers, tokens, heads, head_dim):
    width = heads * head_dim
    at = 0
    for layer in range(layers):
        start = layer * s_layer
        low, step = key_low[layer * width:(layer + 1) * width], key_step[layer * width:(layer + 1) * width]
        for t in range(tokens):
            row, src = y[start + t * s_token:start + t * s_token + width], codes[at:at + width]
            for c in range(width):
                store(row, c, low[c] + np.float32(src[c]) * step[c])
            at += width
        start += s_kind
        for t in range(tokens):
            for h in range(heads):
                first = start + t * s_token + h * head_dim
                row, src = y[first:first + head_dim], codes[at:at + head_dim]
                group = (layer * tokens + t) * heads + h
                low_value, scale = val_low[group], val_step[group]
                for d in range(head_dim):
                    store(row, d, low_value + np.float32(src[d]) * scale)
                at += head_dim
