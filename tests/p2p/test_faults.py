"""P2P faults: the index down or unreachable, a corrupt chunk from a peer, bad configurations."""

from __future__ import annotations

import time

import pytest
import torch

from nencache import KVCache
from nencache.codecs import RawCodec
from nencache.errors import ConfigError
from nencache.format import HEADER_SIZE
from nencache.keys import chunk_keys
from nencache.tiers.peer.index import PeerIndex
from nencache.server.server import BackgroundServer
from nencache.server.settings import ServerSettings
from nencache.tiers.remote import ServerTier
from tests.p2p.util import CHUNK, LAYOUT, MODEL, compute_kv, config, tokens
from tests.redis_util import RedisServer, free_port

pytestmark = pytest.mark.redis


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def test_index_down_is_a_miss_and_back_up_is_republished(own_redis: RedisServer) -> None:
    first, second = tokens(100, 2 * CHUNK), tokens(700, 2 * CHUNK)
    with KVCache(config(own_redis.url), LAYOUT, MODEL) as a, KVCache(config(own_redis.url), LAYOUT, MODEL) as b:
        a.store(first, compute_kv(first))
        a.flush()
        assert b.lookup(first) == len(first)
        own_redis.kill()
        a.store(second, compute_kv(second))  # publishing fails: counted, not raised
        assert a.flush(timeout=10)
        started = time.perf_counter()
        assert b.lookup(second) == 0
        assert b.retrieve_prefix(second) == 0
        assert b.lookup(second) == 0
        assert time.perf_counter() - started < 2.0
        assert a.stats()["tiers"]["p2p"]["errors"] >= 1 and b.stats()["tiers"]["p2p"]["errors"] >= 1
        own_redis.start()  # empty: A republishes what it holds once its probe reaches the index again
        wait_for(lambda: b.lookup(second) == len(second), 15.0, "A to republish and B to see it")
        assert torch.equal(b.retrieve(second).view(torch.int16), compute_kv(second).view(torch.int16))


def test_index_unreachable_from_the_start(tmp_path: object) -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    ids = tokens(0, 2 * CHUNK)
    started = time.perf_counter()
    with KVCache(config(url), LAYOUT, MODEL) as cache:
        assert cache.store(ids, compute_kv(ids)) == 2
        assert cache.flush(timeout=10)
        assert cache.lookup(tokens(5000, CHUNK)) == 0
        assert cache.lookup(ids) == len(ids)
        assert cache.peer is not None and not cache.peer.is_up  # type: ignore[attr-defined]
    assert time.perf_counter() - started < 5.0


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "socket"])
def test_corrupt_chunk_from_a_peer_is_dropped_and_counted(redis_server: RedisServer, shared: bool) -> None:
    """Whether the bytes are copied out of the liar's shared pool (a server's pool, which does not vouch for
    its payloads) or come over the socket, their checksum is verified."""
    ids = tokens(3000, CHUNK)
    with KVCache(config(redis_server.url, p2p_shared_memory=shared), LAYOUT, MODEL + "-corrupt") as b:
        namespace = b.namespace.hex()
        [key] = chunk_keys(ids, CHUNK, b.namespace)
        blob = bytearray(RawCodec().encode(compute_kv(ids), key))
        blob[HEADER_SIZE + 100] ^= 0xFF  # the header is intact, the payload CRC32 no longer matches
        settings = ServerSettings(port=0, admin_port=None, pool_bytes=8 << 20, max_chunk_bytes=1 << 20,
                                  max_request_bytes=8 << 20)
        with BackgroundServer(settings) as liar:
            sender = ServerTier(liar.url, namespace, timeout=2.0)
            sender.put([(key, bytes(blob))])
            sender.close()
            index = PeerIndex(redis_server.url, namespace, ttl=30, timeout=2.0)
            index.publish([key], f"127.0.0.1:{liar.port}")
            index.close()
            assert b.lookup(ids) == CHUNK  # the liar says it has the chunk
            assert b.retrieve_prefix(ids) == 0  # its bytes fail the check: a miss
            assert b.stats()["tiers"]["p2p"]["corrupt"] == 1
            assert len(b.memory) == 0
            assert b.peer.clients.shared_reads == (1 if shared else 0)  # type: ignore[attr-defined]


def test_configurations_that_cannot_work_are_refused(redis_server: RedisServer) -> None:
    with pytest.raises(ConfigError, match="p2p_index_url"):
        KVCache(config(redis_server.url, p2p_index_url=None), LAYOUT, MODEL)
    with pytest.raises(ConfigError, match="local_cpu"):
        KVCache(config(redis_server.url, local_cpu=False), LAYOUT, MODEL)
    with pytest.raises(ConfigError, match="wildcard"):
        KVCache(config(redis_server.url, p2p_host="0.0.0.0"), LAYOUT, MODEL)
    with pytest.raises(ConfigError, match="auth token"):
        KVCache(config(redis_server.url, p2p_host="10.1.2.3"), LAYOUT, MODEL)
    with pytest.raises(ConfigError, match="p2p_ttl"):
        KVCache(config(redis_server.url, p2p_ttl=0), LAYOUT, MODEL)
    with pytest.raises(ConfigError, match="Redis URL"):
        KVCache(config(redis_server.url, p2p_index_url="localhost:8100"), LAYOUT, MODEL)
    with KVCache(config(redis_server.url), LAYOUT, MODEL) as taken:
        port = int(taken.peer.address.rpartition(":")[2])  # type: ignore[attr-defined]
        with pytest.raises(ConfigError, match="p2p_port"):
            KVCache(config(redis_server.url, p2p_port=port), LAYOUT, MODEL)
