"""Benchmark inputs: engine KV with random bits, random token ids, and chunk blobs in the byte format."""

from __future__ import annotations

import os

import torch

from nencache.codecs import RawCodec
from nencache.layout import KVLayout


def random_kv(layout: KVLayout, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Engine KV of `tokens` tokens with random bits (every bit pattern a value may have, NaNs included
    for floats: a copy must move them all unchanged)."""
    kv = torch.empty(layout.shape(tokens), dtype=layout.dtype)
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32}[layout.itemsize]
    info = torch.iinfo(as_int)
    kv.view(as_int).random_(info.min, info.max, generator=generator)
    return kv


def smooth_kv(layout: KVLayout, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Engine KV drawn from a normal distribution: what lossy codecs are made for (random bits are not)."""
    return torch.randn(layout.shape(tokens), generator=generator).to(layout.dtype)


def token_ids(count: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, 50_000, (count,), generator=generator).tolist()


def chunk_blobs(layout: KVLayout, chunk_tokens: int, count: int) -> list[tuple[bytes, bytes]]:
    """`count` raw-codec chunk blobs (header + payload, checksummed) sharing one payload, each under its own key."""
    chunk = smooth_kv(layout, chunk_tokens, torch.Generator().manual_seed(0))
    codec = RawCodec()
    out = []
    for _ in range(count):
        key = os.urandom(16)
        out.append((key, bytes(codec.encode(chunk, key))))
    return out
