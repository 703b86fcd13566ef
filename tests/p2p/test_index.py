"""`PeerIndex` against a real redis-server: holders, unpublish, per-holder and per-key expiry."""

from __future__ import annotations

import time

import pytest

from nencache.p2p import PeerIndex
from nencache.tiers.redis_url import parse_url
from nencache.tiers.resp import Connection
from tests.redis_util import RedisServer

pytestmark = pytest.mark.redis


def test_holders_unpublish_and_expiry(redis_server: RedisServer) -> None:
    short = PeerIndex(redis_server.url, "index-test", ttl=0.4, timeout=2.0)
    long = PeerIndex(redis_server.url, "index-test", ttl=30, timeout=2.0)
    keys = [bytes([i]) * 16 for i in range(3)]
    try:
        assert long.holders(keys) == [[], [], []]
        short.publish(keys, "127.0.0.1:1001")
        time.sleep(0.01)
        long.publish(keys[:2], "127.0.0.1:1002")
        assert long.holders(keys) == [["127.0.0.1:1002", "127.0.0.1:1001"]] * 2 + [["127.0.0.1:1001"]]
        long.unpublish(keys[:1], "127.0.0.1:1002")
        assert long.holders(keys[:1]) == [["127.0.0.1:1001"]]
        time.sleep(0.6)  # the short-lived holder's entries expired; the key it alone held is gone from Redis
        assert long.holders(keys) == [[], ["127.0.0.1:1002"], []]
        target = parse_url(redis_server.url)
        with Connection(target.nodes[0], target, 2.0) as conn:
            assert conn.call("EXISTS", long.rkey(keys[0])) == 1
            assert conn.call("EXISTS", long.rkey(keys[2])) == 0
        assert long.holders([]) == []
    finally:
        short.close()
        long.close()
