"""`VQCodec`: vector quantization of channel pairs against learned, versioned codebooks.

Each chunk is first normalized like int4 (keys per channel over the chunk, values per token and
head, to [0, 1] with a bf16 (min, range) grid), then every channel pair (2p, 2p + 1) of a token
becomes the index of its nearest centroid in the codebook of its (layer, K/V, head, pair), found
through a lookup grid. With `bits=6` that is 3 bits a value (about 4.8x vs bf16), with `bits=4` 2
bits (about 6.8x). As in int4, the first `exact_tokens` tokens of a chunk (a possible attention
sink) are kept as they are: on SmolLM2-135M that took vq from +8.9% to +2% perplexity.

Codebooks are learned by k-means from calibration KV: an explicit `calibrate(chunks)`, or the
chunks the codec encodes (re-learned each time the samples double, up to `calibration_tokens`).
Codec parameter: `codebook_id | exact << 24` (the codebook id is 24 bits; 0 when no token was
quantized). A chunk whose codebook is unknown cannot be decoded (`CorruptChunkError`). Persist
codebooks with `save_codebooks` / `load_codebooks`, or give a `codebook_dir` so every process
reading the chunks finds them.

Payload (little-endian, in order; R = exact, T = tokens - R, P = ceil(head_dim / 2); when T = 0
only the first section)::

    exact      dtype [layers, 2, R, kv_heads, head_dim]   the first R tokens, unchanged
    key_low    bf16  [layers, kv_heads, head_dim]    key_range  bf16 [layers, kv_heads, head_dim]
    val_low    bf16  [layers, T, kv_heads]           val_range  bf16 [layers, T, kv_heads]
    codes_low  u8    [layers, 2, T, kv_heads, ceil(P/2)]   low 4 bits of each code, two a byte
                                                           (the even pair in the low nibble)
    codes_high u8    [layers, 2, T, kv_heads, ceil(P/4)]   bits=6 only: the top 2 bits, four a byte
                                                           (the first pair in the lowest bits)
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable
from typing import ClassVar

import torch

from nencache.codecs.common import (
    SectionCodec,
    affine_params, bad_param, check_chunk, check_header, pack_nibbles, read_sections, section_bytes,
    unpack_nibbles,
)
from nencache.codecs.vq_codebook import BITS, DEFAULT_STORE, Codebook, CodebookStore, grid_size, kmeans
from nencache.errors import ConfigError, CorruptChunkError
from nencache.format import HEADER_SIZE, ChunkHeader
from nencache.layout import KVLayout

Geometry = tuple[int, int, int]  # layers, kv_heads, head_dim
_STORES: dict[str, CodebookStore] = {}


_BLOCK = 4  # layers decoded at a time: keeps the temporaries in cache


def _spec(dtype: torch.dtype, layers: int, tokens: int, heads: int, head_dim: int, bits: int,
          exact: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    bf, u8, pairs, rest = torch.bfloat16, torch.uint8, (head_dim + 1) // 2, tokens - exact
    spec = [(dtype, (layers, 2, exact, heads, head_dim))]
    if rest == 0:
        return spec
    spec += [(bf, (layers, heads, head_dim)), (bf, (layers, heads, head_dim)),
             (bf, (layers, rest, heads)), (bf, (layers, rest, heads)),
             (u8, (layers, 2, rest, heads, (pairs + 1) // 2))]
    return spec + [(u8, (layers, 2, rest, heads, (pairs + 3) // 4))] if bits == 6 else spec


def _pack(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Codes as a nibble plane (low 4 bits) and, for 6 bits, a plane of the high 2 bits, 4 a byte."""
    planes = [pack_nibbles(codes & 15)]
    if bits == 6:
        high = codes >> 4
        if high.shape[-1] % 4:
            high = torch.nn.functional.pad(high, (0, 4 - high.shape[-1] % 4))
        high = high.reshape(*high.shape[:-1], -1, 4)
        planes.append(high[..., 0] | (high[..., 1] << 2) | (high[..., 2] << 4) | (high[..., 3] << 6))
    return planes


def _unpack(planes: list[torch.Tensor], pairs: int) -> torch.Tensor:
    codes = unpack_nibbles(planes[0], pairs)
    if len(planes) == 2:
        high = planes[1]
        high = torch.stack((high & 3, (high >> 2) & 3, (high >> 4) & 3, high >> 6), -1).flatten(-2)
        codes = codes | (high[..., :pairs] << 4)
    return codes


def normalize(chunk: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """bf16 grids (key_low, key_range, val_low, val_range) and the chunk mapped into [0, 1] (fp32,
    padded to an even head_dim)."""
    keys, values = chunk[:, 0], chunk[:, 1]
    key_low, key_range = affine_params(keys.amin(1).float(), keys.amax(1).float(), 1)
    val_low, val_range = affine_params(values.amin(-1).float(), values.amax(-1).float(), 1)
    layers, _, tokens, heads, head_dim = chunk.shape
    unit = torch.zeros((layers, 2, tokens, heads, head_dim + head_dim % 2), dtype=torch.float32)
    torch.addcmul(-key_low[:, None].float() / key_range[:, None].float(), keys.float(),
                  key_range[:, None].float().reciprocal(), out=unit[:, 0, ..., :head_dim])
    torch.addcmul(-val_low[..., None].float() / val_range[..., None].float(), values.float(),
                  val_range[..., None].float().reciprocal(), out=unit[:, 1, ..., :head_dim])
    return [key_low, key_range, val_low, val_range], unit.clamp_(0.0, 1.0)


@dataclasses.dataclass(slots=True)
class _Samples:
    units: list[torch.Tensor] = dataclasses.field(default_factory=list)  # fp16 [L, 2, T, H, D]
    tokens: int = 0
    trained_on: int = 0


@dataclasses.dataclass(slots=True)
class VQCodec(SectionCodec):
    """Vector-quantized channel pairs. `bits` (4 or 6) sizes new codebooks; `codebook_dir` shares
    codebooks through files (else `store`, else the process-wide store); with `auto_calibrate`,
    encoding a geometry with no codebook learns one from the chunks seen, up to `calibration_tokens`;
    `iterations` of k-means; the first `exact_tokens` tokens of each chunk are kept as they are."""

    bits: int = 6
    codebook_dir: str | os.PathLike[str] | None = None
    store: CodebookStore | None = None
    auto_calibrate: bool = True
    calibration_tokens: int = 2048
    iterations: int = 10
    exact_tokens: int = 1
    name: ClassVar[str] = "vq"
    codec_id: ClassVar[int] = 4
    lossy: ClassVar[bool] = True
    _active: dict[Geometry, int] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _samples: dict[Geometry, _Samples] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"VQCodec.bits must be one of {BITS} (code bits per channel pair), got {self.bits!r}")
        if self.calibration_tokens < 1 or self.iterations < 1:
            raise ConfigError("VQCodec.calibration_tokens and iterations must be positive")
        if not isinstance(self.exact_tokens, int) or not 0 <= self.exact_tokens <= 0xFF:
            raise ConfigError(f"VQCodec.exact_tokens must be an int in 0..255, got {self.exact_tokens!r}")
        if self.store is None:
            if self.codebook_dir is None:
                self.store = DEFAULT_STORE
            else:
                path = os.path.abspath(self.codebook_dir)
                self.store = _STORES.setdefault(path, CodebookStore(path))

    # -- codebooks -------------------------------------------------------------------------------

    def calibrate(self, chunks: Iterable[torch.Tensor]) -> int:
        """Learn a codebook from `chunks` (one geometry), make it the one new chunks use; return its id."""
        units, geometry = [], None
        for chunk in chunks:
            chunk = check_chunk(chunk)
            shape = (chunk.shape[0], chunk.shape[3], chunk.shape[4])
            if geometry not in (None, shape):
                raise ConfigError(f"calibration chunks mix geometries {geometry} and {shape}; calibrate each apart")
            geometry = shape
            chunk = chunk[:, :, min(self.exact_tokens, chunk.shape[2]):]  # as encode sees it
            if chunk.shape[2]:
                units.append(normalize(chunk)[1].to(torch.float16))
        if geometry is None or not units:
            raise ConfigError(f"calibrate() needs a chunk with more than exact_tokens={self.exact_tokens} tokens")
        book = self._learn(geometry, units)
        with self._lock:
            self._active[geometry] = book.id
            self._samples.pop(geometry, None)
        return book.id

    def _learn(self, geometry: Geometry, units: list[torch.Tensor]) -> Codebook:
        unit = torch.cat(units, dim=2)
        step = max(1, unit.shape[2] // self.calibration_tokens)
        sample = unit[:, :, ::step].float()
        points = sample.reshape(*sample.shape[:-1], -1, 2).permute(0, 1, 3, 4, 2, 5)  # [L, 2, H, P, N, 2]
        book = Codebook.create(*geometry, self.bits, kmeans(points, self.bits, self.iterations))
        self.store.add(book)
        return book

    def activate(self, codebook_id: int) -> None:
        """Encode new chunks of that codebook's geometry with it (e.g. after `load_codebooks`)."""
        book = self.store.get(codebook_id)
        if book is None:
            raise ConfigError(f"codebook {codebook_id:06x} is not known; load its file first")
        with self._lock:
            self._active[(book.num_layers, book.num_kv_heads, book.head_dim)] = book.id
            self._samples.pop((book.num_layers, book.num_kv_heads, book.head_dim), None)

    def active_codebook(self, layout: KVLayout) -> int | None:
        """Id of the codebook new chunks of this layout get, if any."""
        return self._active.get((layout.num_layers, layout.num_kv_heads, layout.head_dim))

    def save_codebooks(self, path: str | os.PathLike[str]) -> None:
        """Write every codebook of this codec's store to one file."""
        self.store.save(path)

    def load_codebooks(self, path: str | os.PathLike[str], activate: bool = True) -> list[int]:
        """Read a codebook file; with `activate`, the last codebook per geometry encodes new chunks."""
        ids = self.store.load(path)
        for ident in ids if activate else ():
            self.activate(ident)
        return ids

    def _codebook_for(self, chunk: torch.Tensor, unit: torch.Tensor) -> Codebook:
        geometry = (chunk.shape[0], chunk.shape[3], chunk.shape[4])
        with self._lock:
            ident = self._active.get(geometry)
            samples = self._samples.get(geometry)
            if ident is None and not self.auto_calibrate:
                raise ConfigError(f"no VQ codebook for geometry {geometry}: call calibrate(chunks) or "
                                  "load_codebooks(path) first, or enable auto_calibrate")
            if self.auto_calibrate and (ident is None or samples is not None):
                samples = self._samples.setdefault(geometry, _Samples())
                samples.units.append(unit.to(torch.float16))
                samples.tokens += unit.shape[2]
                if ident is None or samples.tokens >= 2 * samples.trained_on:
                    ident = self._learn(geometry, samples.units).id
                    samples.trained_on = samples.tokens
                    self._active[geometry] = ident
                if samples.tokens >= self.calibration_tokens:
                    del self._samples[geometry]
        book = self.store.get(ident)
        assert book is not None
        return book

    # -- codec -----------------------------------------------------------------------------------

    def encode_sections(self, chunk: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """The payload sections of `chunk` and the header's codec parameter."""
        layers, _, tokens, heads, head_dim = chunk.shape
        exact = min(self.exact_tokens, tokens)
        head, chunk, tokens = chunk[:, :, :exact], chunk[:, :, exact:], tokens - exact
        if tokens == 0:
            return [head], exact << 24
        grids, unit = normalize(chunk)
        book = self._codebook_for(chunk, unit)
        grid, pairs = grid_size(book.bits), book.pairs
        base = torch.arange(layers * 2 * heads * pairs, dtype=torch.int32).reshape(layers, 2, 1, heads, pairs)
        cells = unit.mul_(grid).to(torch.int32).clamp_(max=grid - 1)  # grid cell per coordinate
        flat = (cells[..., 0::2] * grid).add_(cells[..., 1::2]).add_(base * (grid * grid))
        codes = book.lookup.index_select(0, flat.reshape(-1))
        planes = _pack(codes.reshape(layers, 2, tokens, heads, pairs), book.bits)
        return [head, *grids, *planes], book.id | exact << 24

    def decode_payload(self, header: ChunkHeader, payload: memoryview) -> torch.Tensor:
        """Decode a checked payload (used by the lossless wrappers after decompressing)."""
        dtype = check_header(header, self.codec_id, self.name)
        layers, tokens, heads, head_dim = header.num_layers, header.num_tokens, header.num_kv_heads, header.head_dim
        ident, exact = header.codec_param & 0xFFFFFF, header.codec_param >> 24
        rest = tokens - exact
        if rest < 0 or (rest == 0) != (ident == 0):
            raise bad_param(self.name, header.codec_param)
        out = torch.empty((layers, 2, tokens, heads, head_dim), dtype=dtype)
        if rest == 0:
            (head,) = read_sections(payload, _spec(dtype, layers, tokens, heads, head_dim, 4, exact))
            out.copy_(head)
            return out
        book = self.store.get(ident)
        if book is None:
            raise CorruptChunkError(
                f"vq chunk needs codebook {ident:06x}, which this process does not know; "
                "load the codebook file it was encoded with (VQCodec.load_codebooks or codebook_dir)")
        if (book.num_layers, book.num_kv_heads, book.head_dim) != (layers, heads, head_dim):
            raise CorruptChunkError(f"vq chunk geometry does not match its codebook {ident:06x}")
        head, key_low, key_range, val_low, val_range, *planes = read_sections(
            payload, _spec(dtype, layers, tokens, heads, head_dim, book.bits, exact))
        out[:, :, :exact] = head
        body = out[:, :, exact:]
        pairs, count = book.pairs, 1 << book.bits
        base = torch.arange(layers * 2 * heads * pairs, dtype=torch.int32).reshape(layers, 2, 1, heads, pairs) * count
        klo, krg = key_low.float()[:, None], key_range.float()[:, None]
        vlo, vrg = val_low.float()[..., None], val_range.float()[..., None]
        for lo in range(0, layers, _BLOCK):
            hi = min(lo + _BLOCK, layers)
            index = _unpack([plane[lo:hi] for plane in planes], pairs).to(torch.int32).add_(base[lo:hi])
            unit = book.pair_words.index_select(0, index.reshape(-1)).view(torch.float32)
            unit = unit.reshape(hi - lo, 2, rest, heads, 2 * pairs)[..., :head_dim]
            body[lo:hi, 0] = torch.addcmul(klo[lo:hi], unit[:, 0], krg[lo:hi])
            body[lo:hi, 1] = torch.addcmul(vlo[lo:hi], unit[:, 1], vrg[lo:hi])
        return out

    def max_encoded_size(self, layout: KVLayout, num_tokens: int) -> int:
        ident = self.active_codebook(layout)
        book = self.store.get(ident) if ident is not None else None
        bits = max(self.bits, book.bits if book is not None else 0)
        spec = _spec(layout.dtype, layout.num_layers, num_tokens, layout.num_kv_heads, layout.head_dim, bits,
                     min(self.exact_tokens, num_tokens))
        return HEADER_SIZE + section_bytes(spec)
