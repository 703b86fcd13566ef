"""The int4 codec's arithmetic in torch ops, step by step: the reference its compiled loops are held to.

`encode` returns the payload sections `Int4Codec` writes (exact tokens, key and value grids, packed codes);
`decode` turns them back into a chunk. Grids are `affine_params`; codes `round(addcmul(bias, x, inv))`
clamped to [0, 15]; decoded values `addcmul(low, code, step)` rounded once into the chunk's dtype.
"""

from __future__ import annotations

import torch

from nencache.codecs.common import affine_params, pack_nibbles, unpack_nibbles

LEVELS = 15


def _quantize(x: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    inv = step.float().reciprocal()
    bias = -low.float() * inv
    return torch.addcmul(bias, x.float(), inv).round_().clamp_(0, LEVELS).to(torch.uint8)


def groups(tokens: int, head_dim: int, key_group: int, value_group: int, exact: int) -> tuple[int, int, int]:
    """The groups `Int4Codec` uses for a chunk: (tokens per key group, channels per value group, exact tokens)."""
    exact = min(exact, tokens)
    rest = tokens - exact
    key = key_group if 0 < key_group < rest else rest
    value = value_group if 0 < value_group < head_dim and head_dim % value_group == 0 else head_dim
    return key, value, exact


def encode(x: torch.Tensor, key_group: int = 0, value_group: int = 0, exact: int = 1) -> list[torch.Tensor]:
    layers, _, tokens, heads, head_dim = x.shape
    key, value, exact = groups(tokens, head_dim, key_group, value_group, exact)
    head, x, rest = x[:, :, :exact], x[:, :, exact:], tokens - exact
    if rest == 0:  # every token exact: empty grids and codes
        bf = torch.bfloat16
        return [head.contiguous(), *(torch.empty(layers, 0, heads, head_dim, dtype=bf) for _ in range(2)),
                *(torch.empty(layers, 0, heads, head_dim // value, dtype=bf) for _ in range(2)),
                torch.empty(layers, 2, 0, heads, (head_dim + 1) // 2, dtype=torch.uint8)]
    g = -(-rest // key)
    keys = x[:, 0]
    if g * key != rest:  # a short last group: the last token repeated into it
        keys = torch.cat([keys, keys[:, -1:].expand(layers, g * key - rest, heads, head_dim)], dim=1)
    keys = keys.reshape(layers, g, key, heads, head_dim)
    key_low, key_step = affine_params(keys.amin(2).float(), keys.amax(2).float(), LEVELS)
    key_codes = _quantize(keys, key_low[:, :, None], key_step[:, :, None])
    values = x[:, 1].reshape(layers, rest, heads, head_dim // value, value)
    val_low, val_step = affine_params(values.amin(-1).float(), values.amax(-1).float(), LEVELS)
    val_codes = _quantize(values, val_low[..., None], val_step[..., None])
    codes = torch.stack([pack_nibbles(key_codes.reshape(layers, -1, heads, head_dim)[:, :rest]),
                         pack_nibbles(val_codes.reshape(layers, rest, heads, head_dim))], 1)
    return [head.contiguous(), key_low, key_step, val_low, val_step, codes]


def decode(sections: list[torch.Tensor], tokens: int, key_group: int = 0, value_group: int = 0,
           exact: int = 1) -> torch.Tensor:
    head, key_low, key_step, val_low, val_step, codes = sections
    layers, _, _, heads, head_dim = head.shape
    key, value, exact = groups(tokens, head_dim, key_group, value_group, exact)
    rest = tokens - exact
    out = torch.empty((layers, 2, tokens, heads, head_dim), dtype=head.dtype)
    out[:, :, :exact] = head
    if rest == 0:
        return out
    g = key_low.shape[1]
    key_codes = torch.nn.functional.pad(unpack_nibbles(codes[:, 0], head_dim), (0, 0, 0, 0, 0, g * key - rest))
    keys = torch.addcmul(key_low.float()[:, :, None], key_codes.reshape(layers, g, key, heads, head_dim).float(),
                         key_step.float()[:, :, None])
    out[:, 0, exact:] = keys.reshape(layers, g * key, heads, head_dim)[:, :rest]
    val_codes = unpack_nibbles(codes[:, 1], head_dim).reshape(layers, rest, heads, head_dim // value, value)
    values = torch.addcmul(val_low.float()[..., None], val_codes.float(), val_step.float()[..., None])
    out[:, 1, exact:] = values.reshape(layers, rest, heads, head_dim)
    return out
