"""The peer endpoint: the shared byte format straight from the cache's pool, read-only, no second pool."""

from __future__ import annotations

import pytest
import torch

from nencache import KVCache
from nencache.codecs import RawCodec
from nencache.keys import chunk_keys
from nencache.p2p.endpoint import PeerStore
from nencache.tiers.remote import ServerTier
from tests.p2p.util import CHUNK, LAYOUT, MODEL, compute_kv, config, tokens
from tests.redis_util import RedisServer

pytestmark = pytest.mark.redis


def test_served_bytes_are_the_raw_codec_format_and_peers_cannot_write(redis_server: RedisServer) -> None:
    ids = tokens(10, 2 * CHUNK + 3)
    kv = compute_kv(ids)
    with KVCache(config(redis_server.url), LAYOUT, MODEL + "-endpoint") as cache:
        cache.store(ids, kv)
        cache.flush()
        keys = chunk_keys(ids, CHUNK, cache.namespace)
        peer = cache.peer
        assert peer is not None
        store = peer.endpoint.store  # type: ignore[attr-defined]
        assert isinstance(store, PeerStore) and store.pool is cache.memory.pool  # no pool of its own
        client = ServerTier(f"nencache://{peer.address}", cache.namespace.hex(), timeout=2.0)  # type: ignore[attr-defined]
        try:
            assert client.contains_prefix(keys) == 3
            blobs = client.get(keys)
            spans = [(0, CHUNK), (CHUNK, 2 * CHUNK), (2 * CHUNK, len(ids))]
            for blob, key, (start, end) in zip(blobs, keys, spans):
                assert blob is not None
                assert bytes(blob) == RawCodec().encode(kv[:, :, start:end].contiguous(), key)
            assert client.get([bytes(16)]) == [None]

            client.put([(bytes(16), RawCodec().encode(kv[:, :, :CHUNK].contiguous(), bytes(16)))])
            assert client.stats().stored_chunks == 0 and bytes(16) not in cache.memory  # PUT refused
            client.delete(keys)
            client.clear()
            assert all(key in cache.memory for key in keys)  # DELETE and CLEAR ignored
            other = ServerTier(f"nencache://{peer.address}", "0" * 32, timeout=2.0)  # type: ignore[attr-defined]
            assert other.contains_prefix(keys) == 0 and other.get(keys[:1]) == [None]  # another namespace
            other.close()
        finally:
            client.close()
        assert cache.stats()["tiers"]["memory"]["hits"] == 0


def test_a_header_is_recomputed_when_a_key_is_stored_again(redis_server: RedisServer) -> None:
    ids = tokens(77, CHUNK)
    with KVCache(config(redis_server.url), LAYOUT, MODEL + "-restore") as cache:
        cache.store(ids, compute_kv(ids))
        cache.flush()
        [key] = chunk_keys(ids, CHUNK, cache.namespace)
        store = cache.peer.endpoint.store  # type: ignore[attr-defined]
        other = torch.zeros(LAYOUT.shape(CHUNK), dtype=LAYOUT.dtype)
        cache.invalidate(ids)
        cache.memory.put_tensor(key, other)  # same key, other bytes, without a publish
        lease = cache.memory.lease(key, count=False)
        assert lease is not None
        try:
            assert bytes(store.view(lease)) == RawCodec().encode(other, key)  # header and payload, one buffer
        finally:
            lease.release()


def test_the_peer_tier_declares_publish_only_its_place_and_gives_snapshots(redis_server: RedisServer) -> None:
    from nencache.tiers.base import Distance, Tier

    ids = tokens(11, 2 * CHUNK)
    with KVCache(config(redis_server.url), LAYOUT, MODEL + "-capabilities") as cache:
        peer = cache.peer
        assert isinstance(peer, Tier) and peer.publish_only and peer.distance is Distance.PEER
        cache.store(ids, compute_kv(ids))
        assert cache.flush(10)
        snapshot = peer.stats()
        assert snapshot.stored_chunks == 2  # keys published, no bytes sent
        snapshot.stored_chunks += 100
        assert peer.stats().stored_chunks == 2
