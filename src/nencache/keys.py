"""Chunk keys: chained, salted, deterministic hashes over token chunks (pure functions).

`key_0 = H(namespace || n_0 || tokens[0:c])`, `key_i = H(key_{i-1} || n_i || tokens[i*c:(i+1)*c])`,
with tokens as little-endian int64, `n_i` the chunk's token count (uint32) and H blake2b-128. A
chunk's key therefore names its whole prefix, and a trailing partial chunk has its own key.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nencache.errors import LayoutError
from nencache.layout import KVLayout

KEY_BYTES = 16
_FORMAT_TAG = b"nencache-keys-v1"
_COUNT = struct.Struct("<I")

TokenIds = Sequence[int] | torch.Tensor | np.ndarray


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk of a token sequence: its key and the token range `[start, end)` it covers."""

    key: bytes
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def _blake(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


def namespace_digest(
    model_id: str,
    layout: KVLayout,
    chunk_size: int,
    *,
    fingerprint: str = "",
    extra: str = "",
    tenant: str = "",
) -> bytes:
    """The salt of every key: model, its fingerprint, layout, chunk size, positional settings, tenant.

    Anything that changes the KV bytes must go in here (`extra` carries e.g. RoPE settings), so a cache
    built for one model can never be served to another.
    """
    fields = [_FORMAT_TAG, model_id, fingerprint, layout.describe(), str(chunk_size), extra, tenant]
    encoded = b"\x00".join(f.encode("utf-8") if isinstance(f, str) else f for f in fields)
    return _blake(encoded)


def salted(namespace: bytes, salt: str | bytes | None) -> bytes:
    """The namespace for one request's `salt` (per-request tenant isolation); unchanged when no salt."""
    if not salt:
        return namespace
    raw = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
    return _blake(namespace + b"\x01salt\x00" + raw)


_I8 = np.dtype("<i8")


def token_array(token_ids: TokenIds) -> np.ndarray:
    """Token ids as a 1-D little-endian int64 array; raise `LayoutError` for anything else."""
    if type(token_ids) is np.ndarray and token_ids.dtype == _I8 and token_ids.ndim == 1 \
            and token_ids.flags.c_contiguous:
        return token_ids  # already what this returns (the hot path: a prompt's tokens, hashed once)
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype is torch.int64 and token_ids.dim() == 1 and token_ids.device.type == "cpu":
            array = token_ids.detach().numpy()
            return array if array.flags.c_contiguous and array.dtype == _I8 else np.ascontiguousarray(array, dtype=_I8)
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.is_complex():
            raise LayoutError(f"token_ids must be a 1-D integer tensor, got {token_ids.dtype} {tuple(token_ids.shape)}")
        array = token_ids.detach().cpu().numpy()
    else:
        try:
            array = np.asarray(token_ids)
        except (TypeError, ValueError) as exc:
            raise LayoutError(f"token_ids must be a sequence of ints: {exc}") from None
        if array.size == 0:
            array = array.astype(np.int64)
        if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            raise LayoutError(f"token_ids must be a 1-D sequence of ints, got {array.dtype} with shape {array.shape}")
    return np.ascontiguousarray(array, dtype="<i8")


def chunk_spans(
    token_ids: TokenIds, chunk_size: int, namespace: bytes, *, include_partial: bool = True
) -> list[ChunkSpan]:
    """Split tokens into chunks of `chunk_size` and key each one by its whole prefix.

    The trailing partial chunk is included when `include_partial` is true.
    """
    if chunk_size <= 0:
        raise LayoutError(f"chunk_size must be positive, got {chunk_size}")
    tokens = token_array(token_ids)
    data = memoryview(tokens).cast("B") if len(tokens) else memoryview(b"")
    n = len(tokens)
    end_full = n - n % chunk_size
    stop = n if include_partial else end_full
    spans: list[ChunkSpan] = []
    prev = namespace
    blake, whole = hashlib.blake2b, _COUNT.pack(chunk_size)
    for start in range(0, stop, chunk_size):  # fed piece by piece: no per-chunk copy of the tokens
        end = min(start + chunk_size, stop)
        digest = blake(prev, digest_size=KEY_BYTES)
        digest.update(whole if end - start == chunk_size else _COUNT.pack(end - start))
        digest.update(data[start * 8 : end * 8])
        prev = digest.digest()
        spans.append(ChunkSpan(prev, start, end))
    return spans


def partial_key(parent: bytes, tokens: np.ndarray) -> bytes:
    """The key of a partial chunk of `tokens` following the chunk keyed `parent` (or the namespace)."""
    return _blake(parent + _COUNT.pack(len(tokens)) + np.ascontiguousarray(tokens, dtype="<i8").tobytes())


def chunk_keys(token_ids: TokenIds, chunk_size: int, namespace: bytes, *, include_partial: bool = True) -> list[bytes]:
    """Just the keys of `chunk_spans`."""
    return [span.key for span in chunk_spans(token_ids, chunk_size, namespace, include_partial=include_partial)]
