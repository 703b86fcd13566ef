"""Two processes share KV through P2P: A computes and stores, B fetches from A; A dies; evictions unpublish."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from nencache import KVCache
from nencache.keys import chunk_keys
from nencache.tiers.peer.index import PeerIndex
from nencache.tiers.memory import raw_page_bytes
from nencache.tiers.redis.url import parse_url
from nencache.tiers.redis.resp import Connection
from tests.p2p.util import CHUNK, LAYOUT, MODEL, PeerProcess, compute_kv, config, tokens
from tests.redis_util import RedisServer

pytestmark = pytest.mark.redis
PeerFactory = Callable[[dict[str, Any]], PeerProcess]


def redis_contents(url: str) -> dict[bytes, list[bytes]]:
    """Every key in Redis with its type check: each must be a sorted set of peer addresses, or the hash of
    their placements beside it (40 bytes each: where a chunk sits in a peer's pool, never its bytes)."""
    target = parse_url(url)
    with Connection(target.nodes[0], target, 5.0) as conn:
        keys: list[bytes] = []
        cursor = b"0"
        while True:
            cursor, batch = conn.call("SCAN", cursor, "COUNT", 1000)  # type: ignore[misc]
            keys += [bytes(k) for k in batch]
            if bytes(cursor) == b"0":
                break
        out = {}
        for key in keys:
            if key.endswith(b":at"):
                assert conn.call("TYPE", key) == b"hash", key
                placed = conn.call("HGETALL", key)
                assert isinstance(placed, list) and all(len(bytes(v)) == 40 for v in placed[1::2]), key
                continue
            assert conn.call("TYPE", key) == b"zset", key
            out[key] = [bytes(m) for m in conn.call("ZRANGE", key, 0, -1)]  # type: ignore[union-attr]
    return out


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_b_gets_a_bit_exact_hit_from_a_and_redis_holds_only_the_index(
        redis_server: RedisServer, peer: PeerFactory) -> None:
    a = peer(config(redis_server.url).as_dict())
    prefix = tokens(1000, 3 * CHUNK + 5)  # three full chunks and a partial one
    assert a.call("store", tokens=prefix) == 4
    contents = redis_contents(redis_server.url)  # every value is a set of peer addresses: no chunk bytes
    assert all(re.fullmatch(rb"127\.0\.0\.1:\d+", m) for members in contents.values() for m in members)
    index = PeerIndex(redis_server.url, a.namespace, ttl=30, timeout=2.0)
    keys = chunk_keys(prefix, CHUNK, bytes.fromhex(a.namespace))
    assert len(keys) == 4 and all(contents[index.rkey(k)] == [a.address.encode()] for k in keys)
    index.close()

    with KVCache(config(redis_server.url), LAYOUT, MODEL) as b:
        assert b.namespace.hex() == a.namespace
        assert b.lookup(prefix) == len(prefix)
        got = b.retrieve(prefix)
        assert bit_equal(got, compute_kv(prefix))
        p2p = b.stats()["tiers"]["p2p"]
        assert p2p["hits"] == 4 and p2p["errors"] == 0 and p2p["corrupt"] == 0
        assert p2p["read_bytes"] == LAYOUT.nbytes(len(prefix)) + 4 * 64  # raw payloads and their headers
        assert b.lookup(prefix) == len(prefix)  # now from B's own memory
    stats = a.call("stats")
    assert stats["tiers"]["memory"]["hits"] == 0  # serving peers is not counted as A's own hits


def test_killed_peer_is_a_clean_counted_miss_and_b_recomputes(redis_server: RedisServer, peer: PeerFactory) -> None:
    a = peer(config(redis_server.url).as_dict())
    first, second = tokens(5000, 2 * CHUNK), tokens(9000, 2 * CHUNK)
    a.call("store", tokens=first)
    a.call("store", tokens=second)
    with KVCache(config(redis_server.url), LAYOUT, MODEL) as b:
        assert b.lookup(first) == len(first)
        assert bit_equal(b.retrieve(first), compute_kv(first))
        a.kill()
        before = b.stats()
        assert b.lookup(second) == 0  # the index still lists A: a dead holder is a miss, not an error
        assert b.retrieve_prefix(second) == 0
        after = b.stats()
        assert after["tiers"]["p2p"]["errors"] > before["tiers"]["p2p"]["errors"]
        assert after["misses"] == before["misses"] + 2
        kv = compute_kv(second)  # B recomputes
        assert b.store(second, kv) == 2
        assert b.lookup(second) == len(second)
        assert bit_equal(b.retrieve(second), kv)
        started = time.perf_counter()
        assert b.lookup(tokens(9000, 2 * CHUNK + CHUNK)) == len(second)  # A is skipped, not waited for
        assert time.perf_counter() - started < 0.5


def test_eviction_in_a_removes_its_index_entries(redis_server: RedisServer, peer: PeerFactory) -> None:
    a = peer(config(redis_server.url, cpu_size=raw_page_bytes(LAYOUT, CHUNK) * 8).as_dict())  # an eight-chunk pool
    old, new, newer = tokens(20_000, 4 * CHUNK), tokens(30_000, 3 * CHUNK), tokens(35_000, 3 * CHUNK)
    index = PeerIndex(redis_server.url, a.namespace, ttl=30, timeout=2.0)
    old_keys = chunk_keys(old, CHUNK, bytes.fromhex(a.namespace))
    try:
        a.call("store", tokens=old)
        a.call("store", tokens=new)
        assert index.holders(old_keys) == [[a.address]] * 4
        a.call("store", tokens=newer)  # evicts the two least recently used chunks; the flush unpublishes them
        assert a.call("stats")["evicted_chunks"] == 2
        assert index.holders(old_keys) == [[], [], [a.address], [a.address]]
        with KVCache(config(redis_server.url), LAYOUT, MODEL) as b:
            assert b.lookup(old) == 0
            assert b.lookup(newer) == len(newer)
    finally:
        index.close()


def test_a_closed_cache_unpublishes_everything(redis_server: RedisServer) -> None:
    ids = tokens(40_000, 2 * CHUNK)
    with KVCache(config(redis_server.url), LAYOUT, MODEL + "-closing") as cache:
        cache.store(ids, compute_kv(ids))
        cache.flush()
        namespace = cache.namespace.hex()
        assert any(namespace.encode() in k for k in redis_contents(redis_server.url))
    assert not any(namespace.encode() in k for k in redis_contents(redis_server.url))


def test_entries_of_a_live_peer_are_refreshed_and_those_of_a_killed_one_expire(
        redis_server: RedisServer, peer: PeerFactory) -> None:
    a = peer(config(redis_server.url, p2p_ttl=1.0).as_dict())
    ids = tokens(50_000, 2 * CHUNK)
    a.call("store", tokens=ids)
    index = PeerIndex(redis_server.url, a.namespace, ttl=30, timeout=2.0)
    keys = chunk_keys(ids, CHUNK, bytes.fromhex(a.namespace))
    try:
        time.sleep(2.5)  # well past the TTL: A refreshes its entries every TTL / 3
        assert index.holders(keys) == [[a.address]] * 2
        a.kill()
        time.sleep(1.6)
        assert index.holders(keys) == [[], []]
        assert not {index.rkey(k) for k in keys} & set(redis_contents(redis_server.url))  # the sets expired too
    finally:
        index.close()
