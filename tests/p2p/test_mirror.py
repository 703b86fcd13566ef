"""`IndexMirror` against a real redis-server: it follows the index's announcements, bounded, and is dropped
while its subscription is down. And `PeerTier` finds holders in it without asking the index."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import nencache.tiers.peer.mirror as mirror_module
import nencache.tiers.redis.control as control
from nencache import KVCache
from nencache.format import split_blob
from nencache.keys import chunk_keys
from nencache.metrics import register
from nencache.tiers.peer.index import Holder, PeerIndex
from nencache.tiers.peer.mirror import IndexMirror
from nencache.tiers.peer.tier import PeerTier
from nencache.tiers.redis.resp import Connection
from nencache.tiers.redis.url import parse_url
from tests.p2p.util import CHUNK, LAYOUT, MODEL, compute_kv, config, settle, tokens
from tests.redis_util import RedisServer

pytestmark = pytest.mark.redis
KEYS = [bytes([i]) * 16 for i in range(8)]


def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def index(redis_server: RedisServer) -> Iterator[PeerIndex]:
    one = PeerIndex(redis_server.url, f"mirror-{uuid.uuid4().hex}", ttl=30, timeout=2.0)
    yield one
    one.close()


def follow(index: PeerIndex, max_keys: int = 1000) -> IndexMirror:
    mirror = IndexMirror(index.subscribe, max_keys=max_keys).start()
    until(lambda: mirror.live)
    return mirror


def test_the_mirror_lists_what_the_index_lists(index: PeerIndex) -> None:
    mirror = follow(index)
    try:
        placed = [bytes([i]) * 40 for i in range(3)]
        index.publish(KEYS[:3], "127.0.0.1:3001", placed)
        time.sleep(0.01)  # scores and expiries are milliseconds: the later publish comes first
        index.publish(KEYS[:2], "127.0.0.1:3002")
        settle(mirror, index)
        assert mirror.lookup(KEYS[:4]) == index.lookup(KEYS[:3]) + [None]
        assert mirror.lookup(KEYS[:1]) == [[Holder("127.0.0.1:3002"), Holder("127.0.0.1:3001", placed[0])]]
        index.unpublish(KEYS[:1], "127.0.0.1:3002")
        index.unpublish(KEYS[2:3], "127.0.0.1:3001")
        settle(mirror, index)
        assert mirror.lookup(KEYS[:3]) == [[Holder("127.0.0.1:3001", placed[0])], [Holder("127.0.0.1:3002"),
                                           Holder("127.0.0.1:3001", placed[1])], None]
        assert mirror.lookup(KEYS[:3]) == index.lookup(KEYS[:2]) + [None]
    finally:
        mirror.close()


def test_entries_expire_with_the_index(redis_server: RedisServer, index: PeerIndex) -> None:
    short = PeerIndex(redis_server.url, index.channel.decode().split(":")[2], ttl=0.3, timeout=2.0)
    assert short.channel == index.channel
    mirror = follow(index)
    try:
        short.publish(KEYS[:2], "127.0.0.1:4001")
        index.publish(KEYS[1:2], "127.0.0.1:4002")
        settle(mirror, index)
        assert mirror.lookup(KEYS[:2]) == [[Holder("127.0.0.1:4002"), Holder("127.0.0.1:4001")][1:],
                                           [Holder("127.0.0.1:4002"), Holder("127.0.0.1:4001")]]
        time.sleep(0.4)
        assert mirror.lookup(KEYS[:2]) == [None, [Holder("127.0.0.1:4002")]] == [None, *index.lookup(KEYS[1:2])]
    finally:
        mirror.close()
        short.close()


def test_the_mirror_is_bounded_and_makes_room_from_expired_entries(redis_server: RedisServer, index: PeerIndex,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirror_module, "_SWEEP_EVERY", 0.0)
    short = PeerIndex(redis_server.url, index.channel.decode().split(":")[2], ttl=0.2, timeout=2.0)
    mirror = follow(index, max_keys=5)
    try:
        index.publish(KEYS[:7], "127.0.0.1:5001")
        until(lambda: mirror.dropped == 2)
        assert len(mirror) == 5 and mirror.lookup(KEYS[5:7]) == [None, None]  # left to the index
        index.unpublish(KEYS[:7], "127.0.0.1:5001")
        until(lambda: len(mirror) == 0)
        short.publish(KEYS[:5], "127.0.0.1:5002")
        until(lambda: len(mirror) == 5)
        time.sleep(0.3)  # the five entries expired; new keys take their room
        index.publish(KEYS[5:7], "127.0.0.1:5001")
        until(lambda: mirror.lookup(KEYS[5:7]) == [[Holder("127.0.0.1:5001")]] * 2)
        assert len(mirror) == 2 and mirror.dropped == 2
    finally:
        mirror.close()
        short.close()


def test_a_message_that_is_not_an_announcement_is_counted_and_changes_nothing(redis_server: RedisServer,
                                                                              index: PeerIndex) -> None:
    mirror = follow(index)
    try:
        index.publish(KEYS[:1], "127.0.0.1:6001")
        target = parse_url(redis_server.url)
        with Connection(target.nodes[0], target, 2.0) as conn:
            conn.call("PUBLISH", index.channel, b"NCAN\x01\x01" + b"\xff" * 40)
        settle(mirror, index)
        assert mirror.malformed == 1 and mirror.live
        assert mirror.lookup(KEYS[:1]) == [[Holder("127.0.0.1:6001")]]
    finally:
        mirror.close()


def test_a_lost_subscription_drops_the_copy_until_it_subscribes_again(own_redis: RedisServer) -> None:
    index = PeerIndex(own_redis.url, "mirror-lost", ttl=30, timeout=1.0)
    mirror = follow(index)
    try:
        index.publish(KEYS[:1], "127.0.0.1:7001")
        settle(mirror, index)
        own_redis.kill()
        until(lambda: not mirror.live)
        assert mirror.lookup(KEYS[:1]) == [None] and len(mirror) == 0
        own_redis.start()
        until(lambda: mirror.live)
        assert mirror.lookup(KEYS[:1]) == [None]  # announced before: the holder's next refresh brings it back
        index.publish(KEYS[:1], "127.0.0.1:7001")
        settle(mirror, index)
        assert mirror.lookup(KEYS[:1]) == [[Holder("127.0.0.1:7001")]]
    finally:
        mirror.close()
        index.close()


def test_a_subscription_that_stops_answering_is_found_out(own_redis: RedisServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis that is alive but silent (stopped) is noticed by an unanswered PING, not waited on forever."""
    monkeypatch.setattr(control, "PING_EVERY", 0.2)
    index = PeerIndex(own_redis.url, "mirror-silent", ttl=30, timeout=0.5)
    mirror = follow(index)
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        until(lambda: not mirror.live, timeout=5.0)
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
        mirror.close()
        index.close()


def test_a_peer_finds_holders_in_its_mirror_without_asking_the_index(redis_server: RedisServer,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """B finds A's chunks over the socket with no index round trip once A's announcements reached B's
    mirror; a chunk A unpublished is asked of the index again."""
    first, second = tokens(700, 2 * CHUNK), tokens(71_000, CHUNK)
    settings = config(redis_server.url, p2p_shared_memory=False)
    with KVCache(settings, LAYOUT, MODEL) as a, KVCache(settings, LAYOUT, MODEL) as b:
        tier = b.peer
        assert isinstance(tier, PeerTier) and tier.mirror is not None
        a.store(first, compute_kv(first))
        assert a.flush(timeout=10)
        settle(tier.mirror, tier.index)
        asked: list[int] = []
        real_lookup = tier.index.lookup
        monkeypatch.setattr(tier.index, "lookup", lambda keys: asked.append(len(keys)) or real_lookup(keys))
        assert b.retrieve_prefix(first) == len(first)
        assert asked == []
        found = b.stats()["p2p"]
        assert found["found_mirror"] >= 2 and found["asked_index"] == 0 and found["found_directory"] == 0
        assert found["mirror_live"] == 1 and found["mirror_keys"] >= 2
        assert b.lookup(second) == 0 and asked == [1]  # not in the mirror: the index is asked
        assert b.stats()["p2p"]["asked_index"] == 1
        registry = CollectorRegistry()
        register(b, registry)
        exposed = generate_latest(registry).decode()
        assert 'nencache_p2p_asked_index_keys_total{model="p2p-test-model"' in exposed
        assert "nencache_p2p_mirror_live{" in exposed and "nencache_p2p_found_mirror_keys_total{" in exposed
        assert a.peer is not None
        a.peer.delete(chunk_keys(first, CHUNK, a.namespace))  # unpublished (A's pool still holds them)
        settle(tier.mirror, tier.index)
        b.memory.clear()
        assert b.lookup(first) == 0 and asked == [1, 2]
        assert b.stats()["tiers"]["p2p"]["corrupt"] == 0


def test_with_no_mirror_every_lookup_asks_the_index(redis_server: RedisServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first = tokens(900, CHUNK)
    settings = config(redis_server.url, p2p_shared_memory=False, p2p_mirror_keys=0)
    with KVCache(settings, LAYOUT, MODEL) as a, KVCache(settings, LAYOUT, MODEL) as b:
        tier = b.peer
        assert isinstance(tier, PeerTier) and tier.mirror is None
        a.store(first, compute_kv(first))
        assert a.flush(timeout=10)
        asked: list[int] = []
        real_lookup = tier.index.lookup
        monkeypatch.setattr(tier.index, "lookup", lambda keys: asked.append(len(keys)) or real_lookup(keys))
        assert b.retrieve_prefix(first) == len(first) and asked == [1]


@pytest.mark.parametrize("mirror_keys", [1024, 0], ids=["mirror", "no-mirror"])
def test_a_chunk_gone_from_the_local_holder_is_read_from_a_second_holder_the_mirror_lists(
        redis_server: RedisServer, mirror_keys: int) -> None:
    """B finds the chunk in local A's directory, A first; the mirror adds C (another machine: its pool is
    not shared). When A's page is freed between the lookup and the read, the read gets it from C instead
    of missing. Without a mirror, A is the only holder named, and the read misses."""
    first, mapping = tokens(800, CHUNK), tokens(95_000, CHUNK)
    a_config = config(redis_server.url)
    with KVCache(a_config, LAYOUT, MODEL) as a, \
            KVCache(config(redis_server.url, p2p_shared_memory=False), LAYOUT, MODEL) as c, \
            KVCache(config(redis_server.url, p2p_mirror_keys=mirror_keys), LAYOUT, MODEL) as b:
        tier = b.peer
        assert isinstance(tier, PeerTier) and a.peer is not None and c.peer is not None
        if tier.mirror is not None:
            settle(tier.mirror, tier.index)  # subscribed before A and C publish
        a.store(mapping, compute_kv(mapping))
        a.store(first, compute_kv(first))
        c.store(first, compute_kv(first))
        assert a.flush(timeout=10) and c.flush(timeout=10)
        assert b.retrieve_prefix(mapping) == CHUNK  # only A holds it: B maps A's pool
        if tier.mirror is not None:
            settle(tier.mirror, tier.index)
        [key] = chunk_keys(first, CHUNK, b.namespace)
        [found] = tier.holders([key])
        named = [h.address for h in found]
        assert named == ([a.peer.address, c.peer.address] if mirror_keys else [a.peer.address])
        a.memory.clear()  # A's page is freed after the lookup, before the read
        [blob] = tier.get([key])
        if not mirror_keys:
            assert blob is None
            return
        assert blob is not None
        split_blob(blob, key, verify=True)  # C's copy: its key and its payload's checksum
        assert b.stats()["tiers"]["p2p"]["corrupt"] == 0


def test_a_redis_that_allows_no_pub_sub_still_holds_the_index(redis_server: RedisServer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Where the index's user may not PUBLISH or SUBSCRIBE (an ACL), publishing still updates the index (the
    refused announcements are counted and logged once), the mirror never goes live, and lookups ask the index."""
    user = f"nopubsub{uuid.uuid4().hex[:8]}"
    redis_server.cli("ACL", "SETUSER", user, "on", ">secret", "~*", "+@all", "-publish", "-subscribe")
    url = f"redis://{user}:secret@127.0.0.1:{redis_server.port}"
    index = PeerIndex(url, "mirror-acl", ttl=30, timeout=2.0)
    mirror = IndexMirror(index.subscribe, max_keys=100).start()
    try:
        with caplog.at_level("WARNING", logger="nencache.p2p"):
            index.publish(KEYS[:2], "127.0.0.1:8001")
            index.publish(KEYS[2:3], "127.0.0.1:8001")
            index.unpublish(KEYS[:1], "127.0.0.1:8001")
        assert index.announce_failures == 3
        assert sum("refused an announcement" in r.getMessage() for r in caplog.records) == 1
        assert index.holders(KEYS[:3]) == [[], ["127.0.0.1:8001"], ["127.0.0.1:8001"]]
        time.sleep(0.5)
        assert not mirror.live and mirror.lookup(KEYS[1:2]) == [None]
    finally:
        mirror.close()
        index.close()
