"""`ServerTier` honours the tier contract, against a server without and with a disk tier."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nencache.config import CacheConfig
from nencache.errors import ConfigError, TierError
from nencache.server.server import BackgroundServer
from nencache.assemble import remote_tier
from nencache.tiers.remote import ServerTier
from tests.server.conftest import local_server, small_settings  # noqa: F401  (the in-process server)
from tests.tiers.contract import TierContract, make_blob, make_key


@pytest.fixture
def tier(local_server: BackgroundServer) -> Iterator[ServerTier]:
    t = ServerTier(local_server.url, uuid.uuid4().hex, timeout=5.0)
    yield t
    t.clear()
    t.close()


class TestServerContract(TierContract):
    """Reads copy chunks out of the server's shared pool (the default on one machine)."""


class TestServerSocketContract(TierContract):
    """Reads come over the socket (GET), as from another machine."""

    @pytest.fixture
    def tier(self, local_server: BackgroundServer) -> Iterator[ServerTier]:
        t = ServerTier(local_server.url, uuid.uuid4().hex, timeout=5.0, shared_memory=False)
        yield t
        t.clear()
        t.close()


@pytest.fixture(scope="module")
def disk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    path = tmp_path_factory.mktemp("server-disk")
    with BackgroundServer(small_settings(disk_path=str(path), disk_bytes=64 << 20)) as server:
        yield server


class TestServerWithDiskContract(TierContract):
    @pytest.fixture
    def tier(self, disk_server: BackgroundServer) -> Iterator[ServerTier]:
        t = ServerTier(disk_server.url, uuid.uuid4().hex, timeout=5.0)
        yield t
        t.clear()
        t.close()


def test_namespaces_are_apart(tier: ServerTier, local_server: BackgroundServer) -> None:
    other = ServerTier(local_server.url, uuid.uuid4().hex, timeout=5.0)
    try:
        key = make_key(1)
        tier.put([(key, make_blob(key, seed=1))])
        assert other.get([key]) == [None] and other.contains_prefix([key]) == 0
        other.put([(key, make_blob(key, seed=2))])
        other.clear()
        assert bytes(tier.get([key])[0]) == make_blob(key, seed=1)
    finally:
        other.close()


def test_large_batches_are_split_and_pipelined(tier: ServerTier) -> None:
    # 40 chunks of ~0.5 MiB: more than one GET (8 keys) and one PUT body (8 MiB) can carry
    items = [(make_key(i), make_blob(make_key(i), tokens=1024, seed=i)) for i in range(40)]
    tier.put(items)
    got = tier.get([k for k, _ in items])
    assert all(g is not None and bytes(g) == b for g, (_, b) in zip(got, items))
    assert tier.contains_prefix([k for k, _ in items]) == 40
    assert tier.stats().errors == 0


def test_evicted_chunks_come_back_from_disk(disk_server: BackgroundServer) -> None:
    t = ServerTier(disk_server.url, uuid.uuid4().hex, timeout=5.0)
    try:
        # 100 chunks of ~0.5 MiB into a 64-page pool: the first ones are evicted from memory
        items = [(make_key(i), make_blob(make_key(i), tokens=1024, seed=i)) for i in range(100)]
        for i in range(0, 100, 10):
            t.put(items[i : i + 10])
            disk_server.server.store.flush()  # type: ignore[union-attr]  # paced to the disk: no write given up
        assert disk_server.server.store.memory.stats().evicted_chunks > 0  # type: ignore[union-attr]
        assert t.contains_prefix([k for k, _ in items]) == 100
        got = t.get([k for k, _ in items[:10]])
        assert [bytes(g) if g is not None else None for g in got] == [b for _, b in items[:10]]
    finally:
        t.clear()
        t.close()


def test_invalid_blobs_are_refused_not_stored(tier: ServerTier) -> None:
    key = make_key(7)
    blob = bytearray(make_blob(key))
    blob[70] ^= 0xFF  # payload damage is not the server's to see; header damage is
    blob[3] ^= 0xFF
    tier.put([(key, bytes(blob))])
    assert tier.get([key]) == [None]
    assert tier.stats().errors == 1 and tier.is_up


def test_keys_must_be_16_bytes(tier: ServerTier) -> None:
    with pytest.raises(TierError):
        tier.get([b"short"])


def test_factory_builds_a_server_tier(local_server: BackgroundServer) -> None:
    tier = remote_tier(CacheConfig(remote_url=local_server.url), "ab" * 16)
    assert isinstance(tier, ServerTier) and tier.is_up
    tier.close()
    with pytest.raises(ConfigError):
        ServerTier("nencache://127.0.0.1:1?ca=x", "ns")


def test_server_stats_over_the_wire(tier: ServerTier) -> None:
    stats = tier.server_stats()
    assert stats is not None and stats["server"]["requests"]["auth"] >= 1
    assert stats["pool"]["page_bytes"] == 1 << 20


def test_tls(tmp_path: Path) -> None:
    from tests.redis_util import make_certificate

    cert, key = make_certificate(tmp_path)
    with BackgroundServer(small_settings(tls_cert=str(cert), tls_key=str(key))) as server:
        url = f"nencaches://127.0.0.1:{server.port}?ca={cert}"
        t = ServerTier(url, "tls", timeout=5.0)
        blob = make_blob(make_key(1), tokens=2048)
        t.put([(make_key(1), blob)])
        assert bytes(t.get([make_key(1)])[0]) == blob
        t.close()
        plain = ServerTier(f"nencaches://127.0.0.1:{server.port}", "tls", timeout=1.0)  # untrusted certificate
        assert not plain.is_up and plain.get([make_key(1)]) == [None]
        plain.close()
