"""`PeerTier` honours the tier contract, between two caches' stores over a real Redis index.

The peer tier is publish-only: it stores no bytes, it tells the index which chunks its own cache
holds, and finds and fetches other caches' chunks. So the contract's chunks are written to a holder
cache A as a cache writes them (into its memory tier, their keys published through A's `PeerTier`,
which also deletes and clears), and the tier under test is reader B's `PeerTier`, which must find
them in the index and fetch them from A's endpoint: out of A's shared pool, or over the socket with
shared memory off. Both caches are built as a `KVCache` builds its store (`build_store`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
import torch

from nencache.assemble import build_store
from nencache.config import CacheConfig
from nencache.layout import KVLayout
from nencache.tiers.peer.tier import PeerTier
from nencache.tiers.base import Tier, TierStats
from nencache.tiers.memory import MemoryTier, raw_page_bytes
from tests.p2p.util import settle
from tests.redis_util import RedisServer
from tests.tiers.contract import TierContract

pytestmark = pytest.mark.redis
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)  # the contract's chunks
CHUNK = 32  # tokens a pool page holds: more than the contract's largest chunk (17)


def settings(index_url: str, *, shared_memory: bool) -> CacheConfig:
    return CacheConfig(chunk_size=CHUNK, cpu_size=raw_page_bytes(LAYOUT, CHUNK) * 64, pin_memory=False,
                       enable_p2p=True, p2p_index_url=index_url, p2p_shared_memory=shared_memory, remote_timeout=5.0)


@dataclass(slots=True)
class HoldingCache:
    """Cache A, whose peer tier publishes the contract's chunks. `put` is a cache's write: the chunk
    lands in A's memory tier, then A's `PeerTier` is told its key with an empty value (as the store's
    write-behind tells a publish-only tier). `delete` and `clear` go to A's `PeerTier` alone: they
    unpublish, while A's memory still holds the bytes, so reads through B show that the tier forgot
    them, not that A could no longer serve them. Each change then waits for B's mirror of the index
    (`settled`) to have applied its announcement, so that B's reads see it whichever way B looks."""

    memory: MemoryTier
    peer: Tier
    settled: Callable[[], None]

    def put(self, items: Sequence[tuple[bytes, bytes | bytearray | memoryview]]) -> None:
        self.memory.put(items)
        self.peer.put([(key, b"") for key, _ in items])
        self.settled()

    def flush(self) -> None:
        self.peer.flush()
        self.settled()

    def delete(self, keys: Sequence[bytes]) -> None:
        self.peer.delete(keys)
        self.settled()

    def clear(self) -> None:
        self.peer.clear()
        self.settled()

    def stats(self) -> TierStats:
        return self.peer.stats()


@dataclass(slots=True)
class Pair:
    holder: HoldingCache
    reader: Tier


@pytest.fixture
def pair(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Pair]:
    """Holder A and reader B: two caches of one fresh namespace, each with its pool, endpoint and peer tier."""
    config, namespace = settings(redis_server.url, shared_memory=request.param), uuid.uuid4().hex
    a = build_store(config, LAYOUT, namespace)
    try:
        b = build_store(config, LAYOUT, namespace)
    except BaseException:
        a.store.close()
        raise
    try:
        assert isinstance(a.peer, PeerTier) and isinstance(b.peer, PeerTier) and b.peer.mirror is not None
        reader = b.peer
        yield Pair(HoldingCache(a.store.memory, a.peer, lambda: settle(reader.mirror, reader.index)), reader)
    finally:
        b.store.close()
        a.store.close()


class PeerContract(TierContract):
    """The contract with chunks held by A and read through B's `PeerTier`."""

    @pytest.fixture
    def tier(self, pair: Pair) -> Tier:
        return pair.reader

    @pytest.fixture
    def holder(self, pair: Pair) -> HoldingCache:
        return pair.holder


@pytest.mark.parametrize("pair", [True], indirect=True, ids=["shared-pool"])
class TestPeerSharedPoolContract(PeerContract):
    """A's pool is a shared region: B copies the chunks out of it."""

    def test_reads_came_out_of_the_shared_pool(self, tier: Tier, holder: HoldingCache) -> None:
        self.test_put_get_roundtrip_exact(tier, holder)
        assert isinstance(tier, PeerTier) and tier.clients.shared_reads == 5


@pytest.mark.parametrize("pair", [False], indirect=True, ids=["socket"])
class TestPeerSocketContract(PeerContract):
    """Shared memory off: B fetches the chunks from A's endpoint over the socket."""

    def test_reads_came_over_the_socket(self, tier: Tier, holder: HoldingCache) -> None:
        self.test_put_get_roundtrip_exact(tier, holder)
        assert isinstance(tier, PeerTier) and tier.clients.shared_reads == 0
