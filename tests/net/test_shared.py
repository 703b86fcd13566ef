"""Shared pools: placements that travel through the index, the checks a mapped reader makes of them,
whether a pool vouches for its payloads, and noticing that its owner has gone."""

from __future__ import annotations

import os

import pytest

from nencache.net.shared import MappedRegion, Placement, SharedRegion, Spot
from nencache.net.shared_pool import peer_pool, region_of
from nencache.pool import MemoryPool

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="shared pools need Linux memfds")


def test_a_placement_round_trips_and_anything_else_is_refused() -> None:
    placement = Placement(os.urandom(16), Spot(4096, 5000, 7))
    packed = placement.pack()
    assert len(packed) == 40 and Placement.unpack(packed) == placement
    for bad in (b"", packed[:-1], packed + b"x"):
        assert Placement.unpack(bad) is None


def one_page_held() -> tuple[SharedRegion, MemoryPool, int, MappedRegion]:
    """A 4-page region whose pool holds one page, and the region mapped as a reader maps it."""
    region = SharedRegion(num_pages=4, page_bytes=8192)
    pool = MemoryPool(4 * 8192, 8192, pin_memory=False, buffer=region.buffer, generations=region.generations)
    page = pool.allocate()
    assert page is not None
    return region, pool, page, MappedRegion.attach(region.describe())


def test_a_reader_takes_only_whole_chunks_at_page_starts_and_only_while_their_page_is_held() -> None:
    region, pool, page, mapped = one_page_held()
    start = region.pool_offset + page * 8192
    spot = Spot(start, 5000, int(region.generations[page]))
    assert mapped.page_of(spot) == page and mapped.current(spot)
    for bad in (Spot(start + 64, 100, spot.generation),  # inside a page: never where a chunk starts
                Spot(start, 0, spot.generation),  # no bytes
                Spot(start, 8193, spot.generation),  # more than a page
                Spot(region.pool_offset - 4096, 10, 0),  # the control block
                Spot(region.pool_offset + 4 * 8192, 10, 0)):  # past the pool
        assert mapped.page_of(bad) is None and not mapped.current(bad)
        assert not mapped.copy(bad, memoryview(bytearray(9000)))
    pool.release(page)
    assert not mapped.current(spot)  # freed: the spot no longer names this chunk


def test_a_mapped_reader_finds_a_recorded_chunk_only_while_its_page_holds_it() -> None:
    region, pool, page, mapped = one_page_held()
    key, inside = os.urandom(16), os.urandom(16)
    spot = Spot(region.pool_offset + page * 8192, 5000, int(region.generations[page]))
    region.record(key, spot)
    region.record(inside, Spot(spot.offset + 64, 100, spot.generation))  # never where a chunk starts
    assert mapped.find(key) == spot
    assert mapped.find(inside) is None and mapped.find(os.urandom(16)) is None
    pool.release(page)
    assert mapped.find(key) is None  # freed: the directory's entry is stale


def test_only_a_cache_pool_vouches_for_its_payloads(monkeypatch: pytest.MonkeyPatch) -> None:
    server_region = SharedRegion(num_pages=1, page_bytes=4096)  # a server's: PUT bodies kept as they come
    assert server_region.describe()["checked"] is False
    assert MappedRegion.attach(server_region.describe()).checked is False
    pool = peer_pool(2 * 4096, 4096, pin_memory=False)
    cache_region = region_of(pool)
    assert cache_region is not None and cache_region.describe()["checked"] is True
    assert MappedRegion.attach(cache_region.describe()).checked is True
    assert MappedRegion.attach(cache_region.describe() | {"checked": "yes"}).checked is False  # only a real true
    import nencache.net.shared as shared

    monkeypatch.setattr(shared, "ORDERED_MEMORY", False)  # a CPU that reorders loads: the checksum pass stays
    assert MappedRegion.attach(cache_region.describe()).checked is False


def test_a_mapping_notices_that_its_owner_closed_the_region() -> None:
    region = SharedRegion(num_pages=1, page_bytes=4096)
    mapped = MappedRegion.attach(region.describe())
    assert mapped.alive()
    region.close()
    assert mapped.alive(max_age=60.0)  # found running a moment ago: not looked for again yet
    assert not mapped.alive()
    assert not mapped.alive(max_age=60.0)  # a closed region is never reported alive from an older look


def test_a_region_without_a_directory_is_still_mapped_and_finds_nothing() -> None:
    """A pool made before directories existed (zeros where the directory's place is) maps as before;
    every lookup then goes to the index."""
    import struct

    region, pool, page, _ = one_page_held()
    control = struct.Struct("<8s16sQQQQQ")
    fields = list(control.unpack_from(region._map, 0))
    key = os.urandom(16)
    region.record(key, Spot(region.pool_offset + page * 8192, 100, int(region.generations[page])))
    region._map[: control.size] = control.pack(*fields[:5], 0, 0)
    mapped = MappedRegion.attach(region.describe())
    assert mapped.find(key) is None and mapped.pages == 4
    region._map[: control.size] = control.pack(*fields[:5], 64, 1 << 20)  # a directory past the pool's start
    with pytest.raises(ValueError, match="does not fit"):
        MappedRegion.attach(region.describe())
    pool.release(page)
