"""What numba's quantizer loops (`nencache.codecs.int8_loops`, `int4_loops`, `fp8_loops`) share: element access,
each group's range and grid parameters; imported with them on first use (see `nencache.codecs.kernels`).

`load`/`store` read an element as fp32 and write fp32 back rounded to nearest even: fp32 as it is, bf16 and
fp16 as 16-bit patterns (numba has no bf16 type, and no fp16 arrays). `special` and `order_key` look at the
bits (a NaN or an infinity; an integer ordered as the value is; `magnitude_key` as its magnitude is), so that
a range's min/max is an integer reduction, which LLVM vectorizes. `ranges` finds every group's min and max
(int8's groups are int4's with one key group of all tokens and one value group of the whole head);
`grid_params` is `nencache.codecs.common.affine_params` in one loop.
"""

# mypy: ignore-errors
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def f32_to_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def half_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_half(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def fma(typingctx, a, b, c):
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return types.float32(types.float32, types.float32, types.float32), codegen


def load(data, index):  # element as fp32 (typed by `_load` below)
    raise NotImplementedError


@overload(load)
def _load(data, index):
    if data.dtype == types.int16:  # bf16: the high half of an fp32
        return lambda data, index: bits_to_f32(np.uint32(np.uint16(data[index])) << np.uint32(16))
    if data.dtype == types.uint16:  # fp16
        return lambda data, index: half_to_f32(data[index])
    return lambda data, index: data[index]


def store(data, index, value):  # fp32 rounded to the element type
    raise NotImplementedError


@overload(store)
def _store(data, index, value):
    if data.dtype == types.int16:  # bf16, rounded to nearest even (finite values)
        def to_bf16(data, index, value):
            u = f32_to_bits(value)
            u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
            data[index] = np.int16(np.uint16(u >> np.uint32(16)))
        return to_bf16
    if data.dtype == types.uint16:
        def to_half(data, index, value):
            data[index] = f32_to_half(value)
        return to_half

    def to_f32(data, index, value):
        data[index] = value
    return to_f32


def special(data, index):  # 1 for a NaN or an infinity (exponent all ones), else 0
    raise NotImplementedError


@overload(special)
def _special(data, index):
    if data.dtype == types.int16:
        return lambda data, index: np.uint32((data[index] & 0x7F80) == 0x7F80)
    if data.dtype == types.uint16:
        return lambda data, index: np.uint32((data[index] & 0x7C00) == 0x7C00)
    return lambda data, index: np.uint32((f32_to_bits(data[index]) & 0x7F800000) == 0x7F800000)


def order_key(data, index):  # an int32 ordered as the element's value is (for finite values; -0 < +0)
    raise NotImplementedError


def from_key(data, key):  # the element value (as fp32) of an `order_key`
    raise NotImplementedError


def magnitude_key(data, index):  # |element| as a non-negative `order_key` (for finite values)
    raise NotImplementedError


@overload(magnitude_key)
def _magnitude_key(data, index):
    if data.dtype == types.int16 or data.dtype == types.uint16:
        return lambda data, index: np.int32(data[index]) & np.int32(0x7FFF)
    return lambda data, index: np.int32(f32_to_bits(data[index]) & np.uint32(0x7FFFFFFF))


@overload(order_key)
def _order_key(data, index):
    if data.dtype == types.int16 or data.dtype == types.uint16:
        def key16(data, index):
            bits = np.int32(np.int16(data[index]))
            return bits ^ ((bits >> 15) & 0x7FFF)
        return key16

    def key32(data, index):
        bits = np.int32(f32_to_bits(data[index]))
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key32


@overload(from_key)
def _from_key(data, key):
    if data.dtype == types.int16:
        return lambda data, key: bits_to_f32(np.uint32(np.uint16(key ^ ((key >> 15) & 0x7FFF))) << np.uint32(16))
    if data.dtype == types.uint16:
        return lambda data, key: half_to_f32(np.uint16(key ^ ((key >> 15) & 0x7FFF)))
    return lambda data, key: bits_to_f32(np.uint32(key ^ ((key >> 31) & 0x7FFFFFFF)))


def _bf16_bits(value):  # fp32 -> bf16 pattern, rounded to nearest even (finite values)
    u = f32_to_bits(value)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def _bf16_value(bits):
    return bits_to_f32(np.uint32(bits) << np.uint32(16))


def _half_next(bits, up):  # the next fp16 pattern toward +inf (up) or -inf, as torch.nextafter
    if (bits & 0x7FFF) == 0:
        return np.uint16(0x0001) if up else np.uint16(0x8001)
    if ((bits & 0x8000) == 0) == up:
        return np.uint16(bits + 1)
    return np.uint16(bits - 1)


bf16_bits = numba.njit(inline="always")(_bf16_bits)
bf16_value = numba.njit(inline="always")(_bf16_value)
half_next = numba.njit(inline="always")(_half_next)


@numba.njit(nogil=True, cache=True)
def grid_params(lo, hi, levels, low_bf, step_bf, low_h, step_h):
    """The grid (min, step) of each group `[lo, hi]` with `levels` steps, as bf16 and as fp16 patterns, the
    arithmetic of `nencache.codecs.common.affine_params` (bf16: min rounded down, step up) and of the int8
    codec's fp16 rounding, operation for operation. Returns (bf16 steps all finite, fp16 fits every group at
    least as finely as bf16)."""
    levels = np.float32(levels)
    widen = np.float32(2.0**-8)
    up = np.float32(1.0 + 2.0**-8)
    tiny = np.float32(2.0**-126)
    limit = np.float32(65504.0)
    finite = True
    fits = True
    for i in range(lo.shape[0]):
        a, b = lo[i], hi[i]
        low = bf16_bits(a - abs(a) * widen)
        step = bf16_bits(max((b - bf16_value(low)) / levels * up, tiny))
        finite &= (step & 0x7F80) != 0x7F80
        low_bf[i], step_bf[i] = low, step
        # fp16: the min rounded to nearest, then one ulp down if that rounded up; the step likewise up
        h = f32_to_half(a)
        if half_to_f32(h) > a:
            h = half_next(h, False)
        hv = half_to_f32(h)
        s = f32_to_half((b - hv) / levels)
        if hv + levels * half_to_f32(s) < b:
            s = half_next(s, True)
        sv = half_to_f32(s)
        fits &= (abs(hv) <= limit and abs(sv) <= limit and sv > 0 and hv <= a and hv + levels * sv >= b
                 and sv <= bf16_value(step))
        low_h[i], step_h[i] = h, s
    return finite, fits


# Rows are taken as slices indexed by their range's counter, which numba knows is not negative: an index it
# must check for wrap-around keeps LLVM from vectorizing the loop. LLVM does not vectorize a float min/max
# reduction (a value group's range), so those compare `order_key`s, integers. `ranges` reports NaNs and
# infinities from the bit patterns (its ranges are discarded then), so it may assume there are none.
@numba.njit(nogil=True, cache=True, fastmath={"nnan", "ninf", "nsz"})
def ranges(x, s_layer, s_kind, s_token, layers, tokens, heads, head_dim, key_group, value_group,
           key_lo, key_hi, val_lo, val_hi):
    """fp32 min and max of every group into the flat `key_lo`/`key_hi` (`[layers, key groups, heads,
    head_dim]`) and `val_lo`/`val_hi` (`[layers, tokens, heads, value groups]`); False if there is a NaN or
    an infinity (the ranges are then meaningless)."""
    width = heads * head_dim
    groups = (tokens + key_group - 1) // key_group
    per_head = head_dim // value_group
    bad = np.uint32(0)
    out = 0
    for layer in range(layers):
        start = layer * s_layer
        for g in range(groups):
            at = (layer * groups + g) * width
            lo, hi = key_lo[at:at + width], key_hi[at:at + width]
            first = g * key_group
            row = x[start + first * s_token:start + first * s_token + width]
            for c in range(width):
                lo[c] = load(row, c)
                hi[c] = lo[c]
            for t in range(first, min(tokens, first + key_group)):
                row = x[start + t * s_token:start + t * s_token + width]
                for c in range(width):
                    v = load(row, c)
                    bad |= special(row, c)
                    lo[c] = min(lo[c], v)
                    hi[c] = max(hi[c], v)
        start += s_kind
        for t in range(tokens):
            for h in range(heads):
                for j in range(per_head):
                    at = start + t * s_token + h * head_dim + j * value_group
                    row = x[at:at + value_group]
                    a = order_key(row, 0)
                    b = a
                    for d in range(value_group):
                        k = order_key(row, d)
                        bad |= special(row, d)
                        a = min(a, k)
                        b = max(b, k)
                    val_lo[out] = from_key(row, a)
                    val_hi[out] = from_key(row, b)
                    out += 1
    return bad == 0
