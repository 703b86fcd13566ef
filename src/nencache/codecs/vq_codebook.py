"""Codebooks of the `vq` codec: learning them (k-means), naming them (content id), storing them (files).

A codebook belongs to one KV geometry (layers, kv_heads, head_dim). For every (layer, K/V, head,
channel pair) it holds 2**bits centroids in the unit square; pair p is channels (2p, 2p + 1) of the
normalized KV (pairing rotary partners i, i + head_dim/2 instead measured no better on SmolLM2).
Its id is a hash of its contents, so the same codebook has the same id in every process.

File format: codebook records back to back, each (little-endian)::

    0  4s magic b"NVQB"      12 H  layers            20 ... centroids f16 [layers, 2, kv_heads,
    4  B  version (1)        14 H  kv_heads                 pairs, 2**bits, 2]
    5  B  bits (4 or 6)      16 H  head_dim          end  I  crc32 of the record before it
    6  2x reserved           18 2x reserved
    8  I  codebook id (24 bits used)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import threading
import zlib
from pathlib import Path

import torch

from nencache.errors import ConfigError

BITS = (4, 6)
_HEAD = struct.Struct("<4sBB2xIHHH2x")
_MAGIC = b"NVQB"
_CRC = struct.Struct("<I")


def grid_size(bits: int) -> int:
    """Cells per axis of the lookup grid that finds a point's nearest centroid (4 per centroid spacing)."""
    return 4 << (bits // 2)


@dataclasses.dataclass(frozen=True, slots=True)
class Codebook:
    """Centroids `[layers, 2, kv_heads, pairs, 2**bits, 2]` (fp16 values, held as fp32) and their lookup grid."""

    id: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    bits: int
    centroids: torch.Tensor
    lookup: torch.Tensor = dataclasses.field(repr=False)  # uint8, flat [layers, 2, heads, pairs, grid*grid]
    pair_words: torch.Tensor = dataclasses.field(repr=False)  # int64, flat [layers, 2, heads, pairs, 2**bits]

    @property
    def pairs(self) -> int:
        return (self.head_dim + 1) // 2

    @classmethod
    def create(cls, layers: int, heads: int, head_dim: int, bits: int, centroids: torch.Tensor) -> Codebook:
        """A codebook of these centroids, its id (24 bits) derived from them."""
        centroids = centroids.to(torch.float16)
        ident = _content_id(layers, heads, head_dim, bits, centroids)
        centroids = centroids.float().contiguous()
        words = centroids.reshape(-1, 2).view(torch.int64).reshape(-1)  # both coordinates in one gather
        return cls(ident, layers, heads, head_dim, bits, centroids, _lookup(centroids, bits).reshape(-1), words)

    def to_bytes(self) -> bytes:
        head = _HEAD.pack(_MAGIC, 1, self.bits, self.id, self.num_layers, self.num_kv_heads, self.head_dim)
        body = head + self.centroids.to(torch.float16).numpy().tobytes()
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def read(cls, data: memoryview, offset: int) -> tuple[Codebook, int]:
        """Parse the record at `offset`; return it and the offset after it. Raise `ConfigError` if damaged."""
        if len(data) - offset < _HEAD.size + _CRC.size:
            raise ConfigError("codebook file is truncated; recalibrate or copy it again")
        magic, version, bits, ident, layers, heads, head_dim = _HEAD.unpack_from(data, offset)
        if magic != _MAGIC or version != 1 or bits not in BITS or min(layers, heads, head_dim) == 0:
            raise ConfigError("not a NenCache codebook file (bad magic, version or geometry)")
        count = layers * 2 * heads * ((head_dim + 1) // 2) * (1 << bits) * 2
        end = offset + _HEAD.size + count * 2
        if end + _CRC.size > len(data) or zlib.crc32(data[offset:end]) != _CRC.unpack_from(data, end)[0]:
            raise ConfigError("codebook file is truncated or damaged (checksum mismatch); recalibrate")
        raw = torch.frombuffer(bytearray(data[offset + _HEAD.size:end]), dtype=torch.float16)
        centroids = raw.reshape(layers, 2, heads, (head_dim + 1) // 2, 1 << bits, 2)
        book = cls.create(layers, heads, head_dim, bits, centroids)
        if book.id != ident:
            raise ConfigError(f"codebook {ident:06x} does not match its contents; the file is damaged")
        return book, end + _CRC.size


def _content_id(layers: int, heads: int, head_dim: int, bits: int, centroids: torch.Tensor) -> int:
    digest = hashlib.blake2b(struct.pack("<HHHB", layers, heads, head_dim, bits), digest_size=3)
    digest.update(centroids.contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") or 1  # 24 bits; 0 means "no codebook"


def _nearest(points: torch.Tensor, centroids: torch.Tensor, block: int = 8) -> torch.Tensor:
    """Index of the nearest centroid: points `[P, N, 2]`, centroids `[P, K, 2]` -> `[P, N]` (exact)."""
    out = torch.empty(points.shape[:2], dtype=torch.long)
    norms = (centroids * centroids).sum(-1).unsqueeze(1)
    for i in range(0, points.shape[0], block):
        dist = torch.baddbmm(norms[i:i + block], points[i:i + block], centroids[i:i + block].transpose(1, 2),
                             alpha=-2.0)
        out[i:i + block] = dist.argmin(-1)
    return out


def _lookup(centroids: torch.Tensor, bits: int) -> torch.Tensor:
    """For every cell of a grid over the unit square, the centroid nearest the cell's centre."""
    grid = grid_size(bits)
    axis = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    cells = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(1, -1, 2)
    flat = centroids.reshape(-1, 1 << bits, 2)
    nearest = _nearest(cells.expand(flat.shape[0], -1, -1), flat, block=64)
    return nearest.to(torch.uint8).reshape(*centroids.shape[:4], grid * grid)


def kmeans(points: torch.Tensor, bits: int, iterations: int) -> torch.Tensor:
    """Lloyd's k-means of points `[..., N, 2]` in the unit square, started from a uniform grid (deterministic)."""
    side = 1 << (bits // 2)
    axis = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    start = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    lead = points.shape[:-2]
    flat = points.reshape(-1, *points.shape[-2:]).float()
    cents = start.expand(flat.shape[0], -1, -1).clone()
    ones = torch.ones(flat.shape[:2])
    for _ in range(iterations):
        nearest = _nearest(flat, cents)
        sums = torch.zeros_like(cents).scatter_add_(1, nearest.unsqueeze(-1).expand(-1, -1, 2), flat)
        counts = torch.zeros(cents.shape[:2]).scatter_add_(1, nearest, ones).unsqueeze(-1)
        cents = torch.where(counts > 0, sums / counts.clamp_min(1), cents)
    return cents.reshape(*lead, 1 << bits, 2)


class CodebookStore:
    """Codebooks by id, shared by every `VQCodec` on this store; with a directory, each codebook is
    also a file `<id>.nvq` there, written when added and read when a chunk names an id not in memory."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._books: dict[int, Codebook] = {}
        self._lock = threading.Lock()

    def add(self, book: Codebook) -> None:
        with self._lock:
            self._books[book.id] = book
        if self.directory is not None:
            path = self.directory / f"{book.id:06x}.nvq"
            if not path.exists():
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
                tmp.write_bytes(book.to_bytes())
                os.replace(tmp, path)

    def get(self, ident: int) -> Codebook | None:
        book = self._books.get(ident)
        if book is None and self.directory is not None:
            path = self.directory / f"{ident:06x}.nvq"
            try:
                books = self.load(path)
            except (OSError, ConfigError):
                return None
            book = self._books.get(ident) if ident in books else None
        return book

    def ids(self) -> list[int]:
        return list(self._books)

    def save(self, path: str | os.PathLike[str], ids: list[int] | None = None) -> None:
        """Write codebooks (all, or those of `ids`) to one file, atomically."""
        books = [self._books[i] for i in (ids if ids is not None else list(self._books))]
        target = Path(path)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.write_bytes(b"".join(book.to_bytes() for book in books))
        os.replace(tmp, target)

    def load(self, path: str | os.PathLike[str]) -> list[int]:
        """Read every codebook of a file into the store; return their ids in file order."""
        data, offset, ids = memoryview(Path(path).read_bytes()), 0, []
        while offset < len(data):
            book, offset = Codebook.read(data, offset)
            with self._lock:
                self._books.setdefault(book.id, book)
            ids.append(book.id)
        return ids


DEFAULT_STORE = CodebookStore()
