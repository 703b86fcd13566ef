"""`ChunkStore` on the core store: namespaces' chunks received in place, written behind to each namespace's
disk, read back and promoted; a failing disk is counted by the store's guard and is a miss."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nencache.server.store import ChunkStore
from nencache.tiers.disk.tier import DiskTier
from tests.server.conftest import small_settings
from tests.server.util import chunk_blob
from tests.tiers.contract import make_key


def put(store: ChunkStore, namespace: bytes, key: bytes, blob: bytes) -> bool:
    space = store.open(namespace, create=True)
    assert space is not None
    page, view = store.take_page(len(blob))
    view[:] = blob
    return store.commit(space, key, page, len(blob))


def failing_get(self: DiskTier, keys: object) -> None:
    raise OSError(5, "Input/output error")


@pytest.fixture
def store(tmp_path: Path):
    store = ChunkStore(small_settings(disk_path=str(tmp_path / "disk"), disk_bytes=64 << 20))
    yield store
    store.close()


def test_a_chunk_read_from_disk_is_promoted_and_counted_once(store: ChunkStore) -> None:
    key, blob = make_key(1), chunk_blob(make_key(1), b"x" * 5000)
    assert put(store, b"ab", key, blob)
    store.flush()
    store.memory.clear()  # on disk only now
    space = store.known(b"ab")
    assert space is not None and store.exists(space, [key]) == 1 and store.exists(space, [key], disk=False) == 0
    held = store.present(space, [key])
    assert held == [False] and bytes(store.read_disk(space, [key])[0]) == blob  # type: ignore[arg-type]
    leases = store.lease_after_read(space, [key], held)
    assert leases[0] is not None and bytes(store.view(leases[0])) == blob  # promoted: served from memory
    leases[0].release()
    stats = store.stats()
    assert stats["memory"]["misses"] == 1 and stats["memory"]["hits"] == 0  # one miss, no hit counted twice
    assert stats["disk"]["hits"] == 1 and stats["disk"]["namespaces"] == 1
    assert stats["disk_writer"] == {"pending": 0, "queued": 1, "written": 1, "dropped": 0, "errors": 0}


def test_a_failing_disk_during_a_read_is_a_miss_counted_and_warned_once(
        store: ChunkStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    key = make_key(1)
    assert put(store, b"ab", key, chunk_blob(key, b"x" * 5000))
    store.flush()
    store.memory.clear()
    space = store.known(b"ab")
    assert space is not None

    monkeypatch.setattr(DiskTier, "get", failing_get)
    with caplog.at_level(logging.WARNING, logger="nencache.server"):
        assert store.read_disk(space, [key]) == [None] and store.read_disk(space, [key]) == [None]
    assert sum("tier disk failed" in r.message for r in caplog.records) == 1
    assert store.stats()["disk"]["errors"] == 2 and key not in {k[-16:] for k in list(store.memory._index)}  # noqa: SLF001


def test_clearing_a_namespace_forgets_its_disk_and_memory_and_spares_the_others(store: ChunkStore) -> None:
    key = make_key(1)
    assert put(store, b"ab", key, chunk_blob(key, b"a" * 100)) and put(store, b"cd", key, chunk_blob(key, b"c" * 100))
    store.flush()
    ab, cd = store.known(b"ab"), store.known(b"cd")
    assert ab is not None and cd is not None
    store.clear(ab)
    assert store.exists(ab, [key]) == 0 and store.exists(cd, [key]) == 1
    store.memory.clear()
    assert store.exists(cd, [key]) == 1  # still on its disk


def test_a_get_over_a_failing_disk_is_answered_as_a_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nencache.server.server import BackgroundServer
    from nencache.tiers.remote import ServerTier

    with BackgroundServer(small_settings(disk_path=str(tmp_path / "disk"), disk_bytes=64 << 20)) as srv:
        tier = ServerTier(srv.url, "ab" * 16, timeout=2.0, shared_memory=False)
        key = make_key(1)
        tier.put([(key, chunk_blob(key, b"x" * 5000))])
        store = srv.server.store  # type: ignore[union-attr]
        store.flush()
        store.memory.clear()
        monkeypatch.setattr(DiskTier, "get", failing_get)
        assert tier.get([key]) == [None]  # a miss, not an error reply
        assert tier.stats().errors == 0 and tier.is_up and store.stats()["disk"]["errors"] == 1
        tier.close()
