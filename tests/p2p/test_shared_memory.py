"""Peers on one machine read each other's pool through shared memory (`p2p_shared_memory`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

import nencache.net.shared_pool as shared
from nencache import KVCache
from nencache.keys import chunk_keys
from nencache.net.shared import Placement, Spot
from nencache.tiers.peer.index import Holder
from nencache.tiers.peer.tier import PeerTier
from tests.p2p.util import CHUNK, LAYOUT, MODEL, PeerProcess, compute_kv, config, settle, tokens
from tests.redis_util import RedisServer

pytestmark = pytest.mark.redis
PeerFactory = Callable[[dict[str, Any]], PeerProcess]


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def peer_tier(cache: KVCache) -> PeerTier:
    assert isinstance(cache.peer, PeerTier)
    return cache.peer


def test_a_local_peer_is_read_out_of_its_shared_pool_bit_exact(redis_server: RedisServer, peer: PeerFactory) -> None:
    a = peer(config(redis_server.url).as_dict())
    prefix = tokens(5000, 4 * CHUNK + 3)
    assert a.call("store", tokens=prefix) == 5
    with KVCache(config(redis_server.url), LAYOUT, MODEL) as b:
        assert b.lookup(prefix) == len(prefix)
        out = b.retrieve(prefix)
        assert bit_equal(out, compute_kv(prefix))
        clients = peer_tier(b).clients
        assert clients.shared_reads == 5  # every chunk came out of A's pool, none over the socket
        assert b.stats()["tiers"]["p2p"]["errors"] == 0
    assert a.call("stats")["tiers"]["p2p"]["errors"] == 0


def test_with_shared_memory_off_the_same_chunks_come_over_the_socket(redis_server: RedisServer,
                                                                     peer: PeerFactory) -> None:
    a = peer(config(redis_server.url).as_dict())
    prefix = tokens(6000, 3 * CHUNK)
    a.call("store", tokens=prefix)
    with KVCache(config(redis_server.url, p2p_shared_memory=False), LAYOUT, MODEL) as b:
        assert bit_equal(b.retrieve(prefix), compute_kv(prefix))
        assert peer_tier(b).clients.shared_reads == 0


def test_a_peer_that_does_not_share_its_pool_is_read_over_the_socket(redis_server: RedisServer,
                                                                     peer: PeerFactory) -> None:
    a = peer(config(redis_server.url, p2p_shared_memory=False).as_dict())
    prefix = tokens(7000, 2 * CHUNK)
    a.call("store", tokens=prefix)
    with KVCache(config(redis_server.url), LAYOUT, MODEL) as b:
        assert bit_equal(b.retrieve(prefix), compute_kv(prefix))
        assert peer_tier(b).clients.shared_reads == 0
        assert b.stats()["tiers"]["p2p"]["errors"] == 0


def test_a_page_reused_while_it_is_copied_is_fetched_again_never_served_stale(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between LOCATE and the copy, A evicts the chunk and its page is refilled with another chunk: the
    page's generation has moved, so B fetches the chunk with GET (here: gone, so a miss) and never
    returns the other chunk's bytes."""
    prefix, other = tokens(100, CHUNK), tokens(90_000, CHUNK)
    small = config(redis_server.url, cpu_size=LAYOUT.nbytes(CHUNK) + 64)  # A's pool: one page
    with KVCache(small, LAYOUT, MODEL) as a, KVCache(config(redis_server.url), LAYOUT, MODEL) as b:
        a.store(prefix, compute_kv(prefix))
        assert a.flush(timeout=10)
        assert b.lookup(prefix) == CHUNK
        real_locate = shared.locate

        def locate_then_reuse(*args: Any) -> Any:
            spots = real_locate(*args)
            a.store(other, compute_kv(other))  # evicts `prefix`: the one page now holds `other`
            return spots

        monkeypatch.setattr(shared, "locate", locate_then_reuse)
        out = torch.zeros(LAYOUT.shape(CHUNK), dtype=LAYOUT.dtype)
        got = b.retrieve_prefix(prefix, out=out)
        assert got == 0  # a miss: the engine recomputes
        assert not bit_equal(out, compute_kv(other))
        assert peer_tier(b).clients.shared_reads == 0


def test_the_pool_of_a_p2p_cache_is_a_shared_region_only_when_asked(redis_server: RedisServer) -> None:
    with KVCache(config(redis_server.url), LAYOUT, MODEL) as on, \
            KVCache(config(redis_server.url, p2p_shared_memory=False), LAYOUT, MODEL) as off:
        assert shared.region_of(on.memory.pool) is not None
        assert shared.region_of(off.memory.pool) is None


class SocketCalls:
    """Counts the requests B's peer clients send to a holder (EXISTS, LOCATE+copy, GET)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import nencache.tiers.peer.client as client

        self.calls: list[str] = []
        for name in ("count_present", "read_shared", "fetch"):
            real = getattr(client, name)
            monkeypatch.setattr(client, name, self._counting(name, real))

    def _counting(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return real(*args, **kwargs)
        return call


def test_once_a_holders_pool_is_mapped_a_lookup_and_a_read_ask_it_nothing_and_return_the_same(
        redis_server: RedisServer, peer: PeerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index gives each chunk's placement in A's pool: B confirms the lookup by the pages' generations
    and copies the chunks straight out, with no request to A, bit-exact as the LOCATE and socket paths."""
    a = peer(config(redis_server.url).as_dict())
    prefix = tokens(11_000, 3 * CHUNK + 5)
    assert a.call("store", tokens=prefix) == 4
    with KVCache(config(redis_server.url), LAYOUT, MODEL) as b, \
            KVCache(config(redis_server.url, p2p_shared_memory=False), LAYOUT, MODEL) as over_socket:
        first = b.retrieve(prefix)  # maps A's pool (SHARED, then LOCATE)
        b.memory.clear()
        calls = SocketCalls(monkeypatch)
        import nencache.format as chunk_format

        real_checksum, checksums = chunk_format.checksum, []
        monkeypatch.setattr(chunk_format, "checksum", lambda data: checksums.append(1) or real_checksum(data))
        assert b.lookup(prefix) == len(prefix)
        again = b.retrieve(prefix)
        assert calls.calls == []  # neither EXISTS nor LOCATE nor GET reached A
        assert checksums == []  # A's pool vouches for its payloads: header and key checked, no second CRC pass
        assert peer_tier(b).clients.shared_reads == 8
        assert bit_equal(again, first) and bit_equal(again, compute_kv(prefix))
        assert bit_equal(over_socket.retrieve(prefix), again)
        assert calls.calls and "read_shared" not in calls.calls  # the socket way did ask A
        assert b.stats()["tiers"]["p2p"]["errors"] == 0 and b.stats()["tiers"]["p2p"]["corrupt"] == 0


def _placed_pair(redis_server: RedisServer, a_pages: int, **b_changes: Any) -> tuple[KVCache, KVCache]:
    a = KVCache(config(redis_server.url, cpu_size=a_pages * (LAYOUT.nbytes(CHUNK) + 64)), LAYOUT, MODEL)
    return a, KVCache(config(redis_server.url, **b_changes), LAYOUT, MODEL)


def _held_by_a_and_mapped_by_b(a: KVCache, b: KVCache, prefix: list[int]) -> None:
    """A stores and publishes `prefix`; B reads it once (mapping A's pool), then forgets it."""
    a.store(prefix, compute_kv(prefix))
    assert a.flush(timeout=10)
    assert b.retrieve_prefix(prefix) == CHUNK
    b.memory.clear()


def test_a_page_reused_between_the_lookup_and_the_copy_is_a_miss_never_the_other_chunk(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """B has A's pool mapped and the index's placement of the chunk; before B copies it, A evicts the chunk
    and refills its one page with another: the generation moved, so the copy is refused and the chunk is
    asked of A (gone there: a miss). The other chunk's bytes never reach the engine."""
    import nencache.tiers.peer.client as client

    prefix, other = tokens(200, CHUNK), tokens(95_000, CHUNK)
    a, b = _placed_pair(redis_server, a_pages=1)
    with a, b:
        _held_by_a_and_mapped_by_b(a, b, prefix)
        assert b.lookup(prefix) == CHUNK  # confirmed by the page's generation
        real_copy = client.copy_out

        def reuse_then_copy(*args: Any) -> Any:
            a.store(other, compute_kv(other))  # evicts `prefix`: the one page now holds `other`
            return real_copy(*args)

        monkeypatch.setattr(client, "copy_out", reuse_then_copy)
        reads = peer_tier(b).clients.shared_reads
        out = torch.zeros(LAYOUT.shape(CHUNK), dtype=LAYOUT.dtype)
        assert b.retrieve_prefix(prefix, out=out) == 0
        assert not bit_equal(out, compute_kv(other))
        assert peer_tier(b).clients.shared_reads == reads
        assert b.stats()["tiers"]["p2p"]["corrupt"] == 0  # stale is not corrupt


def test_a_placement_left_in_the_index_after_its_page_was_reused_is_not_a_hit(redis_server: RedisServer) -> None:
    prefix, other = tokens(300, CHUNK), tokens(96_000, CHUNK)
    a, b = _placed_pair(redis_server, a_pages=1)
    with a, b:
        _held_by_a_and_mapped_by_b(a, b, prefix)
        tier = peer_tier(a)
        [key] = chunk_keys(prefix, CHUNK, a.namespace)
        [[holder]] = tier.index.lookup([key])
        assert holder.placement is not None
        a.store(other, compute_kv(other))  # the page is reused; A unpublishes `prefix` ...
        assert a.flush(timeout=10)
        tier.flush()
        tier.index.publish([key], holder.address, [holder.placement])  # ... but the old entry comes back
        assert b.lookup(prefix) == 0  # the generation moved: A is asked (EXISTS) and says no
        assert b.retrieve_prefix(prefix) == 0


@pytest.mark.parametrize("mirror_keys", [0, 1024], ids=["index", "mirror"])
def test_forged_placements_never_serve_wrong_bytes(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
                                                   mirror_keys: int) -> None:
    """Placements come from Redis (the index, or the announcements B's mirror follows), so they are checked
    like any input: another pool's nonce, a spot inside a page, or another chunk's spot are never served
    for this key; the chunk is asked of its holder."""
    from nencache.net.shared import MappedRegion

    monkeypatch.setattr(MappedRegion, "find", lambda self, key: None)  # A's directory is not asked
    first, second = tokens(400, CHUNK), tokens(97_000, CHUNK)
    a, b = _placed_pair(redis_server, a_pages=4, p2p_mirror_keys=mirror_keys)
    mirror = peer_tier(b).mirror
    assert (mirror is not None) == bool(mirror_keys)
    with a, b:
        a.store(first, compute_kv(first))
        _held_by_a_and_mapped_by_b(a, b, second)
        index = peer_tier(a).index
        [key, other_key] = [chunk_keys(ids, CHUNK, a.namespace)[0] for ids in (first, second)]
        [[real]], [[others]] = index.lookup([key]), index.lookup([other_key])
        assert real.placement is not None and others.placement is not None
        found = Placement.unpack(real.placement)
        assert found is not None
        inside = Placement(found.nonce, Spot(found.spot.offset + 64, found.spot.length - 64, found.spot.generation))
        foreign = Placement(os.urandom(16), found.spot)
        for forged in (others.placement, inside.pack(), foreign.pack()):
            b.memory.clear()
            index.publish([key], real.address, [forged])
            if mirror is not None:
                settle(mirror, index)
                assert mirror.lookup([key]) == [[Holder(real.address, forged)]]
            assert b.lookup(first) == CHUNK
            assert bit_equal(b.retrieve(first), compute_kv(first))
        assert b.stats()["tiers"]["p2p"]["corrupt"] == 1  # the other chunk's bytes, refused by their key


def test_a_mapped_holders_directory_answers_lookups_without_the_index(own_redis: RedisServer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Once B has mapped A's pool, B finds A's chunks in A's directory: no index round trip, and hits
    even while the index is down. A chunk A no longer holds is not found there."""
    first, second = tokens(500, 2 * CHUNK), tokens(98_000, CHUNK)
    with KVCache(config(own_redis.url), LAYOUT, MODEL) as a, KVCache(config(own_redis.url), LAYOUT, MODEL) as b:
        a.store(first, compute_kv(first))
        assert a.flush(timeout=10)
        assert b.retrieve_prefix(first) == len(first)  # maps A's pool
        b.memory.clear()
        index = peer_tier(b).index
        asked: list[int] = []
        real_lookup = index.lookup
        monkeypatch.setattr(index, "lookup", lambda keys: asked.append(len(keys)) or real_lookup(keys))
        assert b.lookup(first) == len(first)
        assert bit_equal(b.retrieve(first), compute_kv(first))
        assert asked == [] and b.stats()["p2p"]["found_directory"] >= 2
        own_redis.kill()
        a.store(second, compute_kv(second))  # publishing fails; A's directory has it all the same
        assert a.flush(timeout=10)
        b.memory.clear()
        assert b.lookup(second) == len(second)
        assert bit_equal(b.retrieve(second), compute_kv(second))
        a.memory.clear()  # A's pages are freed: its directory's entries are stale
        b.memory.clear()
        assert b.lookup(first) == 0 and b.retrieve_prefix(second) == 0
        assert b.stats()["tiers"]["p2p"]["corrupt"] == 0
