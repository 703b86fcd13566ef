"""`Directory`: where each chunk sits in a shared pool, kept in the pool's own shared memory.

A P2P cache records there the spot of every chunk it publishes, so a peer on the same machine that
has mapped its pool finds a chunk without a round trip to the P2P index (benchmarks/RESULTS.md,
"p2p: same-machine lookups in the holder's directory").

The table is set-associative: a key's bucket is its first 8 bytes modulo the number of buckets (keys
are hashes), and a bucket is `WAYS` slots. The owner records a chunk in the slot that already names
its key, else in an empty one or one whose chunk is gone from the pool (its page was freed since),
else over the bucket's entry the key's bits pick. With at least twice as many slots as pages, a key
is pushed out only when one bucket holds more chunks than it has ways. A slot is six u64 words::

    sequence   even when the slot is whole, odd while the owner writes it
    key        2 words, the chunk key's 16 bytes
    offset, length, generation    the chunk's `Spot`

The owner writes a slot under its sequence number; a reader takes the slot only if the number was
even and unchanged across its read (a seqlock: x86 keeps stores in order and loads in order, which
`nencache.net.shared` relies on already; on CPUs that reorder them, a spot read torn would still fail
the checks below, and there every copy's checksum is verified too). Entries are never removed. One whose page was freed since
carries an old generation, which the reader checks before trusting it, and the copy that follows is
checked again as any shared-pool copy is; a key pushed out of its bucket is not found, and the index
answers for it.
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections.abc import Callable

SLOT_WORDS = 6
SLOT_BYTES = 8 * SLOT_WORDS
WAYS = 4
# Native formats: each word is one 8-byte load or store (the owner and its readers share one machine).
_KEY = struct.Struct("2Q")
_WORD = struct.Struct("Q")
_FIELDS = struct.Struct("5Q")
_BUCKET = struct.Struct(f"{WAYS * SLOT_WORDS}Q")
Buffer = bytearray | memoryview | mmap.mmap


def slot_count(pages: int) -> int:
    """The number of slots for a pool of `pages` pages: the power of two at or above twice that (one bucket
    at least)."""
    return max(WAYS, 1 << max(1, 2 * pages - 1).bit_length())


class Directory:
    """The slots of one pool's directory, over shared memory (written by the owner, read by peers).

    `live(offset, generation)` says whether a recorded chunk is still in the pool; only the owner, which
    writes, needs it. Slots are read and written with `struct`, whose one call per bucket is the
    shortest code path to a few words of shared memory (a lookup runs right after a chunk copy, with
    the CPU's caches cold)."""

    __slots__ = ("_buffer", "_offset", "_buckets", "_live", "_lock")

    def __init__(self, buffer: Buffer, offset: int, slots: int,
                 live: Callable[[int, int], bool] | None = None) -> None:
        if slots < WAYS or slots & (slots - 1):
            raise ValueError(f"a directory needs a power-of-two number of slots, at least {WAYS}; got {slots}")
        if offset < 0 or offset + slots * SLOT_BYTES > len(memoryview(buffer)):
            raise ValueError("the directory does not fit its buffer")
        self._buffer, self._offset, self._buckets = buffer, offset, slots // WAYS
        self._live = live
        self._lock = threading.Lock()  # the owner's writers

    def record(self, key: bytes, offset: int, length: int, generation: int) -> None:
        """Say that the chunk `key` sits at `offset` (`length` bytes, its page at `generation`)."""
        if len(key) != _KEY.size:
            return
        low, high = _KEY.unpack(key)
        base = self._offset + (low % self._buckets) * WAYS * SLOT_BYTES
        with self._lock:
            words = _BUCKET.unpack_from(self._buffer, base)
            rows = [words[way * SLOT_WORDS : (way + 1) * SLOT_WORDS] for way in range(WAYS)]
            way = next((i for i, row in enumerate(rows) if row[1] == low and row[2] == high), None)
            if way is None:
                live = self._live
                way = next((i for i, row in enumerate(rows) if row[0] == 0 or live is None or not live(row[3], row[5])),
                           (low >> 32) % WAYS)
            at = base + way * SLOT_BYTES
            sequence = rows[way][0] | 1  # odd: readers leave the slot alone until it is whole again
            _WORD.pack_into(self._buffer, at, sequence)
            _FIELDS.pack_into(self._buffer, at + 8, low, high, offset, length, generation)
            _WORD.pack_into(self._buffer, at, sequence + 1)

    def find(self, key: bytes) -> tuple[int, int, int] | None:
        """`(offset, length, generation)` last recorded for `key`, or None (not recorded, pushed out of its
        bucket since, or being written now). The generation may be stale: the caller checks it."""
        if len(key) != _KEY.size:
            return None
        low, high = _KEY.unpack(key)
        base = self._offset + (low % self._buckets) * WAYS * SLOT_BYTES
        words = _BUCKET.unpack_from(self._buffer, base)  # in address order: each slot's sequence first
        for at in range(0, WAYS * SLOT_WORDS, SLOT_WORDS):
            if words[at + 1] == low and words[at + 2] == high:
                sequence = words[at]
                if sequence & 1 or _WORD.unpack_from(self._buffer, base + 8 * at)[0] != sequence:
                    return None
                return words[at + 3], words[at + 4], words[at + 5]
        return None
