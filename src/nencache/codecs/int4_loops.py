"""The int4 codec's codes and decoding, compiled by numba (see `nencache.codecs.kernels`, which imports this
module on first use so that importing NenCache never imports numba).

Like int8's loops (`nencache.codecs.int8_loops`; the groups' ranges are `loop_elements.ranges`), with the
int4 codec's groups: keys per channel over groups
of `key_group` tokens (the last group may be short), values per token and head over groups of `value_group`
channels; and with codes packed two a byte along head_dim (the even channel in the low nibble, a zero code
after an odd head_dim's last channel). The arithmetic is the torch codec's,
so blobs and decoded chunks are the same bit for bit.
"""

# mypy: ignore-errors
import numba
import numpy as np

from nencache.codecs.loop_elements import fma, load, store


@numba.njit(inline="always")
def pack(codes, heads, head_dim, dest):
    """One token's codes (`heads * head_dim`, each < 16) packed two a byte into `dest`."""
    half = (head_dim + 1) // 2
    pairs = head_dim // 2
    for h in range(heads):
        src, row = codes[h * head_dim:(h + 1) * head_dim], dest[h * half:(h + 1) * half]
        for i in range(pairs):
            row[i] = src[2 * i] | (src[2 * i + 1] << 4)
        if head_dim % 2:
            row[pairs] = src[head_dim - 1]


@numba.njit(inline="always")
def unpack(packed, heads, head_dim, codes):
    """`pack` undone: one token's codes out of `packed` into `codes`."""
    half = (head_dim + 1) // 2
    pairs = head_dim // 2
    for h in range(heads):
        src, row = packed[h * half:(h + 1) * half], codes[h * head_dim:(h + 1) * head_dim]
        for i in range(pairs):
            row[2 * i] = src[i] & 15
            row[2 * i + 1] = src[i] >> 4
        if head_dim % 2:
            row[head_dim - 1] = src[pairs] & 15


@numba.njit(nogil=True, cache=True)
def quantize(x, s_layer, s_kind, s_token, layers, tokens, heads, head_dim, key_group, value_group,
             key_bias, key_inv, val_bias, val_inv, levels, codes):
    """`clamp(rint(fma(x, inv, bias)), 0, levels)` of every element, packed into the contiguous uint8 `codes`
    (`[layers, 2, tokens, heads, ceil(head_dim / 2)]`); `inv`/`bias` flat, per group as `ranges` orders them.
    With an even head_dim and value group, a byte's two codes are made side by side; otherwise each token's
    codes go through a scratch row."""
    width = heads * head_dim
    packed = heads * ((head_dim + 1) // 2)
    groups = (tokens + key_group - 1) // key_group
    per_head = head_dim // value_group
    paired = head_dim % 2 == 0 and value_group % 2 == 0
    zero = np.float32(0)
    scratch = np.empty(width, np.uint8)
    out = 0
    for layer in range(layers):
        start = layer * s_layer
        for t in range(tokens):
            at = (layer * groups + t // key_group) * width
            inv, bias = key_inv[at:at + width], key_bias[at:at + width]
            row, dest = x[start + t * s_token:start + t * s_token + width], codes[out:out + packed]
            if paired:
                for i in range(packed):
                    a = np.rint(fma(load(row, 2 * i), inv[2 * i], bias[2 * i]))
                    b = np.rint(fma(load(row, 2 * i + 1), inv[2 * i + 1], bias[2 * i + 1]))
                    dest[i] = np.uint8(min(max(a, zero), levels)) | (np.uint8(min(max(b, zero), levels)) << 4)
            else:
                for c in range(width):
                    q = np.rint(fma(load(row, c), inv[c], bias[c]))
                    scratch[c] = np.uint8(min(max(q, zero), levels))
                pack(scratch, heads, head_dim, dest)
            out += packed
        start += s_kind
        group = layer * tokens * heads * per_head
        for t in range(tokens):
            for h in range(heads):
                for j in range(per_head):
                    at = start + t * s_token + h * head_dim + j * value_group
                    row = x[at:at + value_group]
                    scale, shift = val_inv[group], val_bias[group]
                    if paired:
                        first = out + (h * head_dim + j * value_group) // 2
                        dest = codes[first:first + value_group // 2]
                        for i in range(value_group // 2):
                            a = np.rint(fma(load(row, 2 * i), scale, shift))
                            b = np.rint(fma(load(row, 2 * i + 1), scale, shift))
                            dest[i] = np.uint8(min(max(a, zero), levels)) | (np.uint8(min(max(b, zero), levels)) << 4)
                    else:
                        dest = scratch[h * head_dim + j * value_group:h * head_dim + (j + 1) * value_group]
                        for d in range(value_group):
                            q = np.rint(fma(load(row, d), scale, shift))
                            dest[d] = np.uint8(min(max(q, zero), levels))
                    group += 1
            if not paired:
                pack(scratch, heads, head_dim, codes[out:out + packed])
            out += packed


@numba.njit(nogil=True, cache=True)
def dequantize(codes, key_group, value_group, key_low, key_step, val_low, val_step,
               y, s_layer, s_kind, s_token, layers, tokens, heads, head_dim):
    """`low + step * code` (fp32, rounded once into `y`'s type) of the packed `codes`, into `y`: a byte's two
    values side by side with an even head_dim and value group, else through a scratch row of codes."""
    width = heads * head_dim
    packed = heads * ((head_dim + 1) // 2)
    groups = (tokens + key_group - 1) // key_group
    per_head = head_dim // value_group
    paired = head_dim % 2 == 0 and value_group % 2 == 0
    scratch = np.empty(width, np.uint8)
    at = 0
    for layer in range(layers):
        start = layer * s_layer
        for t in range(tokens):
            src = codes[at:at + packed]
            at += packed
            first = (layer * groups + t // key_group) * width
            low, step = key_low[first:first + width], key_step[first:first + width]
            row = y[start + t * s_token:start + t * s_token + width]
            if paired:
                for i in range(packed):
                    byte = src[i]
                    store(row, 2 * i, low[2 * i] + np.float32(byte & 15) * step[2 * i])
                    store(row, 2 * i + 1, low[2 * i + 1] + np.float32(byte >> 4) * step[2 * i + 1])
            else:
                unpack(src, heads, head_dim, scratch)
                for c in range(width):
                    store(row, c, low[c] + np.float32(scratch[c]) * step[c])
        start += s_kind
        group = layer * tokens * heads * per_head
        for t in range(tokens):
            if not paired:
                unpack(codes[at:at + packed], heads, head_dim, scratch)
            for h in range(heads):
                for j in range(per_head):
                    first = start + t * s_token + h * head_dim + j * value_group
                    row = y[first:first + value_group]
                    low_value, scale = val_low[group], val_step[group]
                    if paired:
                        byte_at = at + (h * head_dim + j * value_group) // 2
                        src = codes[byte_at:byte_at + value_group // 2]
                        for i in range(value_group // 2):
                            byte = src[i]
                            store(row, 2 * i, low_value + np.float32(byte & 15) * scale)
                            store(row, 2 * i + 1, low_value + np.float32(byte >> 4) * scale)
                    else:
                        src = scratch[h * head_dim + j * value_group:h * head_dim + (j + 1) * value_group]
                        for d in range(value_group):
                            store(row, d, low_value + np.float32(src[d]) * scale)
                    group += 1
            at += packed
