"""`PeerIndex` against a real redis-server: holders, unpublish, per-holder and per-key expiry."""

from __future__ import annotations

import time

import pytest

from nencache.tiers.peer.index import Holder, PeerIndex
from nencache.tiers.peer.mirror import IndexMirror
from nencache.tiers.redis.url import parse_url
from nencache.tiers.redis.resp import Connection
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


def test_holders_come_with_the_placements_they_published(redis_server: RedisServer) -> None:
    """One lookup gives each holder and where the chunk sits in its shared pool; republishing without a
    placement (a pool no longer shared) or unpublishing drops it; a holder that never gave one has None."""
    index = PeerIndex(redis_server.url, "index-placed", ttl=30, timeout=2.0)
    keys = [bytes([i]) * 16 for i in range(3)]
    placed = [bytes([i]) * 40 for i in range(3)]
    try:
        index.publish(keys, "127.0.0.1:3001", placed)
        time.sleep(0.01)
        index.publish(keys[:2], "127.0.0.1:3002")
        assert index.lookup(keys) == [[Holder("127.0.0.1:3002"), Holder("127.0.0.1:3001", placed[0])],
                                      [Holder("127.0.0.1:3002"), Holder("127.0.0.1:3001", placed[1])],
                                      [Holder("127.0.0.1:3001", placed[2])]]
        time.sleep(0.01)  # scores are milliseconds: the republished holder comes first
        index.publish(keys[:1], "127.0.0.1:3001", [None])
        index.unpublish(keys[1:2], "127.0.0.1:3001")
        assert index.lookup(keys) == [[Holder("127.0.0.1:3001"), Holder("127.0.0.1:3002")],
                                      [Holder("127.0.0.1:3002")], [Holder("127.0.0.1:3001", placed[2])]]
        assert index.holders(keys) == [["127.0.0.1:3001", "127.0.0.1:3002"], ["127.0.0.1:3002"], ["127.0.0.1:3001"]]
    finally:
        index.close()


def test_index_on_a_cluster_spreads_holder_sets_and_follows_the_topology(tmp_path) -> None:
    """redis-py routes every sorted set to its slot's node; after a node's restart the index answers again.
    The announcements reach a mirror subscribed to one node, whichever node each PUBLISH went to."""
    from tests.p2p.util import settle
    from tests.redis_util import start_cluster

    cluster = start_cluster(tmp_path)
    index = PeerIndex(cluster.url, "index-cluster", ttl=30, timeout=2.0)
    mirror = IndexMirror(index.subscribe, max_keys=1024).start()
    keys = [bytes([i]) * 16 for i in range(32)]
    try:
        index.check()
        settle(mirror, index)  # subscribed: what follows is announced to it
        index.publish(keys, "127.0.0.1:2001")
        assert index.holders(keys) == [["127.0.0.1:2001"]] * len(keys)
        assert all(int(node.cli("dbsize")) > 0 for node in cluster.nodes)  # no hash tag: every node holds some
        index.unpublish(keys[:16], "127.0.0.1:2001")
        assert index.holders(keys) == [[]] * 16 + [["127.0.0.1:2001"]] * 16
        settle(mirror, index)
        assert mirror.lookup(keys) == [None] * 16 + [[Holder("127.0.0.1:2001")]] * 16
        cluster.nodes[1].kill()
        with pytest.raises(OSError):
            index.holders(keys)
        index.reset()
        cluster.nodes[1].start()
        deadline = time.monotonic() + 20
        while True:
            try:
                index.check()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        index.publish(keys, "127.0.0.1:2002")
        assert all(h[0] == "127.0.0.1:2002" for h in index.holders(keys))
    finally:
        mirror.close()
        index.close()
        cluster.kill()


def test_unreachable_index_fails_fast_with_an_oserror() -> None:
    from tests.redis_util import free_port

    index = PeerIndex(f"redis://127.0.0.1:{free_port()}", "down", ttl=5, timeout=0.5)
    try:
        for call in (index.check, lambda: index.holders([b"k" * 16]), lambda: index.publish([b"k" * 16], "a:1")):
            started = time.perf_counter()
            with pytest.raises(OSError):
                call()
            assert time.perf_counter() - started < 0.5  # refused at once: no retries, no backoff inside
    finally:
        index.close()


def test_wrong_password_says_what_to_fix(tmp_path) -> None:
    from tests.redis_util import start_server

    server = start_server(tmp_path, ["--requirepass", "s3cret"])
    try:
        index = PeerIndex(f"redis://:wrong@127.0.0.1:{server.port}", "auth", ttl=5, timeout=2.0)
        with pytest.raises(OSError, match="check the user and password"):
            index.check()
        with pytest.raises(OSError, match="check the user, password"):  # the lookup's own connection says so too
            index.holders([b"k" * 16])
        index.close()
    finally:
        server.kill()


def test_a_single_servers_lookups_skip_redis_py_and_answer_the_same(redis_server: RedisServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Lookups on one server run on a bare RESP connection: the same holders and placements as redis-py
    gives, and a connection the server dropped is replaced on the next call."""
    from nencache.tiers.redis.control import RedisControl

    index = PeerIndex(redis_server.url, "bare", ttl=30, timeout=2.0)
    try:
        keys = [bytes([i]) * 16 for i in range(3)]
        index.publish(keys[:2], "10.0.0.1:7000", [b"p" * 40, None])
        index.publish(keys[:1], "10.0.0.2:7000")
        expected = index.lookup(keys)
        assert [[h.address for h in found] for found in expected] == [["10.0.0.2:7000", "10.0.0.1:7000"],
                                                                      ["10.0.0.1:7000"], []]
        assert expected[0][1].placement == b"p" * 40 and expected[1][0].placement is None
        monkeypatch.setattr(RedisControl, "pipeline", lambda *a, **k: pytest.fail("a lookup went through redis-py"))
        assert index.lookup(keys) == expected
        import redis

        killer = redis.Redis.from_url(redis_server.url)
        assert killer.execute_command("CLIENT", "KILL", "TYPE", "normal") >= 1  # the lookup's connection dropped
        killer.close()
        assert index.lookup(keys) == expected  # the dropped idle connection is noticed and replaced
    finally:
        index.close()
