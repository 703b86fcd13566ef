"""Peers on one machine read each other's pool through shared memory (`p2p_shared_memory`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import nencache.net.shared_pool as shared
from nencache import KVCache
from nencache.p2p.tier import PeerTier
from tests.p2p.util import CHUNK, LAYOUT, MODEL, PeerProcess, compute_kv, config, tokens
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
