"""RedisTier chunks stored in parts (here 256-byte parts, so every test chunk spans several)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from nencache.tiers.redis.tier import RedisTier
from nencache.tiers.redis.parts import part_count, part_key
from tests.redis_util import RedisServer
from tests.tiers.contract import TierContract, make_blob, make_key
from tests.tiers.test_redis import items, raw, rkey

pytestmark = pytest.mark.redis
SEGMENT = 256


@pytest.fixture
def tier(redis_server: RedisServer) -> Iterator[RedisTier]:
    t = RedisTier(redis_server.url, uuid.uuid4().hex, segment_bytes=SEGMENT)
    yield t
    t.clear()
    t.close()


class TestRedisPartsContract(TierContract):
    pass


class TestRedisClusterPartsContract(TierContract):
    @pytest.fixture
    def tier(self, redis_cluster) -> Iterator[RedisTier]:
        t = RedisTier(redis_cluster.url, uuid.uuid4().hex, segment_bytes=SEGMENT)
        assert t.is_up
        yield t
        t.clear()
        t.close()


def test_parts_are_cut_at_the_segment_size_and_all_deleted(redis_server: RedisServer) -> None:
    namespace = uuid.uuid4().hex
    t = RedisTier(redis_server.url, namespace, segment_bytes=SEGMENT, ttl=60)
    try:
        [(key, blob)] = items(1)
        parts = part_count(len(blob), SEGMENT)
        assert parts > 2
        t.put([(key, blob)])
        with raw(redis_server.url) as conn:
            stored = [bytes(conn.call("GET", part_key(rkey(namespace, key), p))) for p in range(parts)]
            assert stored == [blob[p * SEGMENT : (p + 1) * SEGMENT] for p in range(parts)]
            assert all(0 < conn.call("PTTL", part_key(rkey(namespace, key), p)) <= 60_000 for p in range(parts))
            t.delete([key])
            assert conn.call("EXISTS", *[part_key(rkey(namespace, key), p) for p in range(parts)]) == 0
    finally:
        t.close()


@pytest.mark.parametrize("damage", ["evicted", "junk"])
def test_a_lost_or_damaged_part_is_a_miss_and_the_rest_is_dropped(redis_server: RedisServer, damage: str) -> None:
    namespace = uuid.uuid4().hex
    t = RedisTier(redis_server.url, namespace, segment_bytes=SEGMENT)
    try:
        stored = items(3)
        t.put(stored)
        victim = rkey(namespace, stored[1][0])
        with raw(redis_server.url) as conn:
            if damage == "evicted":
                conn.call("DEL", part_key(victim, 2))
            else:
                conn.call("SET", part_key(victim, 2), b"x" * SEGMENT)
            got = t.get([k for k, _ in stored])
            assert got[1] is None and bytes(got[0]) == stored[0][1] and bytes(got[2]) == stored[2][1]
            assert t.stats().corrupt == (1 if damage == "junk" else 0)
            assert conn.call("EXISTS", *[part_key(victim, p) for p in range(part_count(len(stored[1][1]), SEGMENT))]) == 0
        assert t.contains_prefix([k for k, _ in stored]) == 1  # the prefix now ends at the lost chunk
    finally:
        t.clear()
        t.close()


def test_a_truncated_first_part_is_counted_corrupt(redis_server: RedisServer) -> None:
    namespace = uuid.uuid4().hex
    t = RedisTier(redis_server.url, namespace, segment_bytes=SEGMENT)
    try:
        [(key, blob)] = items(1)
        t.put([(key, blob)])
        with raw(redis_server.url) as conn:
            conn.call("SET", rkey(namespace, key), blob[: SEGMENT - 10])
        assert t.get([key]) == [None] and t.stats().corrupt == 1
    finally:
        t.clear()
        t.close()


@pytest.mark.parametrize(("writer", "reader"), [(SEGMENT, 1 << 20), (1 << 20, SEGMENT), (SEGMENT, 512)])
def test_tiers_with_other_segment_sizes_read_each_other(redis_server: RedisServer, writer: int, reader: int) -> None:
    namespace = uuid.uuid4().hex
    a = RedisTier(redis_server.url, namespace, segment_bytes=writer)
    b = RedisTier(redis_server.url, namespace, segment_bytes=reader)
    try:
        stored = items(4, tokens=24)
        a.put(stored)
        assert [bytes(g) for g in b.get([k for k, _ in stored])] == [v for _, v in stored]
        assert b.stats().corrupt == 0
        b.delete([k for k, _ in stored])
        assert a.contains_prefix([k for k, _ in stored]) == 0
        with raw(redis_server.url) as conn:
            assert conn.call("KEYS", rkey(namespace, b"") + b"*") == []
    finally:
        a.close()
        b.close()


def test_sizes_that_change_between_calls_read_back_exact(tier: RedisTier) -> None:
    sizes = [8, 8, 40, 3, 8, 64, 1, 40]
    stored = [(make_key(i), make_blob(make_key(i), tokens=n, seed=i)) for i, n in enumerate(sizes)]
    tier.put(stored)
    for _ in range(2):  # the second round starts with a guessed size from the first
        for order in (stored, stored[::-1], stored[2:5]):
            got = tier.get([k for k, _ in order])
            assert [bytes(g) for g in got] == [v for _, v in order]
    assert tier.stats().corrupt == 0 and tier.stats().errors == 0
