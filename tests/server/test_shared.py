"""Shared-memory reads: a client on the server's machine copies chunks out of the server's mapped pool."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nencache.net.shared import MappedRegion, SharedRegion, Spot
from nencache.pool import MemoryPool
from nencache.server.server import BackgroundServer
from nencache.tiers.remote import ServerTier
from tests.server.conftest import small_settings
from tests.server.util import ServerProcess
from tests.tiers.contract import make_blob, make_key

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="shared pools need Linux memfds")


def blobs(n: int, start: int = 0, seed: int = 0) -> list[tuple[bytes, bytes]]:
    return [(make_key(i), make_blob(make_key(i), tokens=64, seed=seed + i)) for i in range(start, start + n)]


def test_a_copy_is_valid_until_its_page_is_freed() -> None:
    region = SharedRegion(num_pages=4, page_bytes=8192)
    pool = MemoryPool(4 * 8192, 8192, pin_memory=False, buffer=region.buffer, generations=region.generations)
    page = pool.allocate()
    assert page is not None
    data = os.urandom(5000)
    pool.page(page)[: len(data)].numpy()[:] = memoryview(data)
    mapped = MappedRegion.attach(region.describe())
    spot = Spot(region.pool_offset + page * 8192, len(data), int(region.generations[page]))
    into = bytearray(len(data))
    assert mapped.copy(spot, memoryview(into)) and bytes(into) == data
    pool.release(page)  # freed: whatever is copied from it now may be another chunk's bytes
    assert not mapped.copy(spot, memoryview(into))
    for bad in (Spot(0, 10, 0), Spot(region.pool_offset + 4 * 8192, 10, 0), Spot(region.pool_offset, 8193, 0)):
        assert not mapped.copy(bad, memoryview(bytearray(9000)))


def test_attach_checks_the_nonce_and_size() -> None:
    region = SharedRegion(num_pages=2, page_bytes=4096)
    with pytest.raises(ValueError):
        MappedRegion.attach(region.describe() | {"nonce": os.urandom(16).hex()})
    with pytest.raises(ValueError):
        MappedRegion.attach(region.describe() | {"size": region.size + 4096})
    region.close()
    with pytest.raises(OSError):
        MappedRegion.attach(region.describe() | {"fd": 1 << 20})


@pytest.fixture
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer(small_settings()) as srv:
        yield srv


def test_reads_come_from_the_shared_pool(server: BackgroundServer) -> None:
    tier = ServerTier(server.url, uuid.uuid4().hex, timeout=5.0)
    try:
        stored = blobs(6)
        tier.put(stored)
        got = tier.get([k for k, _ in stored] + [make_key(99)])
        assert [bytes(b) for b in got[:6]] == [b for _, b in stored] and got[6] is None
        assert tier.shared_reads == 6
    finally:
        tier.close()


@pytest.mark.parametrize("change", ["delete", "overwrite"])
def test_a_page_freed_during_the_copy_is_fetched_again(server: BackgroundServer, change: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    namespace = uuid.uuid4().hex
    tier, other = ServerTier(server.url, namespace, timeout=5.0), ServerTier(server.url, namespace, timeout=5.0)
    try:
        key, old = blobs(1)[0]
        new = make_blob(key, tokens=64, seed=1234)
        tier.put([(key, old)])
        copy = MappedRegion.copy

        def racing_copy(self: MappedRegion, spot: Spot, into: memoryview) -> bool:
            other.delete([key])  # its page is freed (and, when re-stored, likely reused for the new bytes)
            if change == "overwrite":
                other.put([(key, new)])
            return copy(self, spot, into)

        monkeypatch.setattr(MappedRegion, "copy", racing_copy)
        [got] = tier.get([key])
        assert tier.shared_reads == 0
        assert got is None if change == "delete" else bytes(got) == new
    finally:
        tier.close()
        other.close()


def test_chunks_only_on_disk_are_promoted_and_shared(tmp_path: Path) -> None:
    # The disk reads are waited for (a loaded machine may take longer than the default 0.1 s wait for them)
    settings = small_settings(pool_bytes=4 << 20, disk_path=str(tmp_path), disk_bytes=64 << 20, disk_read_wait=5.0)
    with BackgroundServer(settings) as srv:
        tier = ServerTier(srv.url, "ab" * 16, timeout=5.0)
        try:
            stored = blobs(12)  # three times the pool: the first ones live only on disk
            for item in stored:
                tier.put([item])
                srv.server.store.flush()  # type: ignore[union-attr]  # paced to the disk: no write is given up
            got = tier.get([k for k, _ in stored[:4]])
            assert [bytes(b) for b in got] == [b for _, b in stored[:4]]
            assert tier.shared_reads == 4
        finally:
            tier.close()


def test_a_restarted_server_is_mapped_again(server_process: ServerProcess) -> None:
    server_process.start()
    tier = ServerTier(server_process.url, "restart", timeout=5.0)
    try:
        tier.put(blobs(3))
        assert [bytes(b) for b in tier.get([make_key(i) for i in range(3)])] == [b for _, b in blobs(3)]
        server_process.kill()
        server_process.start()
        assert tier.get([make_key(0)]) == [None]  # the first call after the restart finds the old pool gone
        fresh = blobs(3, seed=50)
        tier.put(fresh)
        before = tier.shared_reads
        assert [bytes(b) for b in tier.get([k for k, _ in fresh])] == [b for _, b in fresh]
        assert tier.shared_reads == before + 3
    finally:
        tier.close()


def test_a_server_that_does_not_share_is_read_over_the_socket(server_process: ServerProcess) -> None:
    server_process.config["server_shared_memory"] = False
    server_process.start()
    tier = ServerTier(server_process.url, "plain", timeout=5.0)
    try:
        tier.put(blobs(3))
        assert [bytes(b) for b in tier.get([make_key(i) for i in range(3)])] == [b for _, b in blobs(3)]
        assert tier.shared_reads == 0 and tier.stats().errors == 0
    finally:
        tier.close()


def test_a_client_can_opt_out(server: BackgroundServer) -> None:
    tier = ServerTier(server.url, uuid.uuid4().hex, timeout=5.0, shared_memory=False)
    try:
        tier.put(blobs(2))
        assert [bytes(b) for b in tier.get([make_key(0), make_key(1)])] == [b for _, b in blobs(2)]
        assert tier.shared_reads == 0
    finally:
        tier.close()
