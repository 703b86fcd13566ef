"""The directory of a shared pool: keys found where they were recorded, buckets that keep what is live,
slots being written never read, and readers over a read-only mapping."""

from __future__ import annotations

import mmap
import os
import struct

from nencache.net.directory import SLOT_BYTES, SLOT_WORDS, WAYS, Directory, slot_count


def key(bucket: int, buckets: int, n: int) -> bytes:
    """A key that falls in `bucket` (its first 8 bytes modulo `buckets`), told apart by `n`."""
    return struct.pack("2Q", bucket + buckets * (n + 1) + (n << 40), n)


class Pool:
    """What the owner knows: which (offset, generation) still hold their chunk."""

    def __init__(self) -> None:
        self.held: set[tuple[int, int]] = set()

    def live(self, offset: int, generation: int) -> bool:
        return (offset, generation) in self.held


def test_slot_count_is_a_power_of_two_at_least_twice_the_pages() -> None:
    assert [slot_count(p) for p in (1, 2, 3, 4, 5, 1000)] == [4, 4, 8, 8, 16, 2048]


def test_a_recorded_key_is_found_and_recording_it_again_moves_it() -> None:
    directory = Directory(bytearray(SLOT_BYTES * 16), 0, 16)
    keys = [os.urandom(16) for _ in range(6)]
    for n, k in enumerate(keys):
        directory.record(k, 4096 * (n + 1), 100 + n, n)
    found = {n: directory.find(k) for n, k in enumerate(keys)}
    assert all(spot in (None, (4096 * (n + 1), 100 + n, n)) for n, spot in found.items())
    directory.record(keys[0], 8192 * 9, 7, 42)
    assert directory.find(keys[0]) == (8192 * 9, 7, 42)
    assert directory.find(os.urandom(16)) is None
    directory.record(b"short", 1, 2, 3)  # not a chunk key: nothing recorded, nothing found
    assert directory.find(b"short") is None


def test_a_bucket_keeps_four_and_reuses_the_slot_of_a_chunk_that_is_gone_first() -> None:
    pool = Pool()
    slots = 16
    buckets = slots // WAYS
    table = bytearray(SLOT_BYTES * slots)
    directory = Directory(table, 0, slots, live=pool.live)
    keys = [key(1, buckets, n) for n in range(6)]
    for n in range(WAYS):
        pool.held.add((4096 * n, n))
        directory.record(keys[n], 4096 * n, 10, n)
    assert [directory.find(k) for k in keys[:WAYS]] == [(4096 * n, 10, n) for n in range(WAYS)]
    pool.held.discard((4096 * 2, 2))  # the chunk of keys[2] left the pool
    pool.held.add((4096 * 4, 4))
    directory.record(keys[4], 4096 * 4, 10, 4)
    assert directory.find(keys[2]) is None
    assert [directory.find(keys[n]) for n in (0, 1, 3, 4)] == [(4096 * n, 10, n) for n in (0, 1, 3, 4)]
    pool.held.add((4096 * 5, 5))
    directory.record(keys[5], 4096 * 5, 10, 5)  # every way live: one of them is pushed out
    assert directory.find(keys[5]) == (4096 * 5, 10, 5)
    assert sum(directory.find(keys[n]) is not None for n in (0, 1, 3, 4)) == WAYS - 1
    for other in range(buckets):  # the other buckets were left alone
        if other != 1:
            assert not any(table[other * WAYS * SLOT_BYTES : (other + 1) * WAYS * SLOT_BYTES])


def test_a_slot_being_written_is_not_read_and_readers_need_no_write_access() -> None:
    slots = 8
    shared = mmap.mmap(-1, SLOT_BYTES * slots + 64)
    owner = Directory(shared, 64, slots)
    reader = Directory(memoryview(shared).toreadonly(), 64, slots)
    k = os.urandom(16)
    owner.record(k, 4096, 500, 3)
    assert reader.find(k) == (4096, 500, 3)
    words = memoryview(shared)[64 : 64 + SLOT_BYTES * slots].cast("Q")
    row = next(i for i in range(slots) if words[i * SLOT_WORDS + 1] != 0)
    words[row * SLOT_WORDS] += 1  # the owner is half-way through writing the slot
    assert reader.find(k) is None
    words[row * SLOT_WORDS] += 1
    assert reader.find(k) == (4096, 500, 3)
    owner.record(k, 8192, 600, 4)
    assert reader.find(k) == (8192, 600, 4) and words[row * SLOT_WORDS] % 2 == 0
    words.release()


def test_a_directory_must_fit_its_buffer() -> None:
    import pytest

    for offset, slots in ((0, 3), (0, 0), (8, 4), (-1, 4)):
        with pytest.raises(ValueError):
            Directory(bytearray(SLOT_BYTES * 4), offset, slots)


def test_a_reader_in_another_process_never_sees_a_half_written_slot() -> None:
    """The owner rewrites one key's slot as fast as it can while a reader process looks it up: every spot
    found is one the owner recorded whole (its three fields agree), never a mix of two."""
    import multiprocessing
    import time

    slots = 8
    shared = mmap.mmap(-1, SLOT_BYTES * slots)
    k = os.urandom(16)
    Directory(shared, 0, slots).record(k, 4096, 1, 1)
    stop = multiprocessing.get_context("fork").Event()

    def write() -> None:
        owner, n = Directory(shared, 0, slots), 1
        while not stop.is_set():
            n += 1
            owner.record(k, 4096 * n, n, n)

    writer = multiprocessing.get_context("fork").Process(target=write, daemon=True)
    writer.start()
    try:
        reader, found, misses = Directory(shared, 0, slots), set(), 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            spot = reader.find(k)
            if spot is None:
                misses += 1
                continue
            offset, length, generation = spot
            assert offset == 4096 * length and generation == length, f"a torn slot was read: {spot}"
            found.add(length)
        assert len(found) > 100  # the reader saw the owner's writes as they went on
    finally:
        stop.set()
        writer.join(10)
