"""Config -> tiers (+ the peer endpoint) -> `Store`: the only module that knows URL schemes and which tiers exist.

A tier is added here with one registry line: a local tier in `LOCAL_TIERS` (wanted when a config key
is set), a remote one in `REMOTE_SCHEMES` (chosen by the scheme of `remote_url`). The order the store
asks tiers in is theirs to declare (`Tier.distance`); nothing here sorts by name or type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from nencache.codecs import get_codec
from nencache.config import CacheConfig
from nencache.errors import ConfigError
from nencache.format import HEADER_SIZE
from nencache.layout import KVLayout
from nencache.policy.base import EvictionPolicy
from nencache.pool import MemoryPool
from nencache.net.warn import WarnOnce
from nencache.store import Store
from nencache.tiers.base import Tier
from nencache.tiers.memory import MemoryTier, raw_page_bytes
from nencache.writer import Drop, LowerTier, WritePolicy

Eviction = Callable[[], EvictionPolicy] | None


def _disk(config: CacheConfig, namespace: str, eviction: Eviction) -> Tier:
    from nencache.tiers.disk.tier import DiskTier

    return DiskTier(str(config.tiers.disk.path), namespace, int(config.tiers.disk.size), io_threads=config.tiers.io_threads,
                    eviction=eviction() if eviction is not None else None)


def _redis(config: CacheConfig, namespace: str) -> Tier:
    from nencache.tiers.redis.tier import RedisTier

    return RedisTier(str(config.tiers.remote.url), namespace, timeout=config.tiers.remote.timeout, ttl=config.tiers.remote.ttl,
                     key_prefix=config.tiers.remote.key_prefix)


def _server(config: CacheConfig, namespace: str) -> Tier:
    from nencache.tiers.remote import ServerTier

    return ServerTier(str(config.tiers.remote.url), namespace, timeout=config.tiers.remote.timeout, auth_token=config.auth_token,
                      shared_memory=config.tiers.remote.shared_memory)


@dataclass(frozen=True, slots=True)
class LocalTier:
    """A tier of this machine: built when `wanted(config)`, its chunks written with the codec `codec(config)`."""

    wanted: Callable[[CacheConfig], object]
    build: Callable[[CacheConfig, str, Eviction], Tier]
    codec: Callable[[CacheConfig], str]


LOCAL_TIERS: tuple[LocalTier, ...] = (
    LocalTier(lambda c: c.tiers.disk.path, _disk, lambda c: c.tiers.disk.codec),
)
REMOTE_SCHEMES: dict[str, Callable[[CacheConfig, str], Tier]] = {
    **dict.fromkeys(("redis", "rediss", "unix", "valkey", "valkeys", "redis-cluster", "rediss-cluster",
                     "valkey-cluster", "valkeys-cluster"), _redis),
    **dict.fromkeys(("nencache", "nencaches"), _server),
}


def lower_tiers(config: CacheConfig, namespace: str, *, eviction: Eviction = None) -> list[tuple[Tier, str]]:
    """(tier, codec name) of every tier below memory that `config` asks for. `eviction` makes a local
    tier's eviction policy (default LRU)."""
    tiers = [(entry.build(config, namespace, eviction), entry.codec(config)) for entry in LOCAL_TIERS
             if entry.wanted(config)]
    if config.tiers.remote.url:
        tiers.append((remote_tier(config, namespace), config.tiers.remote.codec))
    return tiers


def remote_tier(config: CacheConfig, namespace: str) -> Tier:
    """The remote tier named by `remote_url`."""
    url = str(config.tiers.remote.url)
    scheme = urlsplit(url).scheme.lower()
    build = REMOTE_SCHEMES.get(scheme)
    if build is None:
        raise ConfigError(f"remote_url {url!r}: unsupported scheme {scheme!r}; use one of "
                          f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    return build(config, namespace)


def memory_tier(config: CacheConfig, layout: KVLayout, page_tokens: int, *, eviction: Eviction = None) -> MemoryTier:
    """The CPU tier: a static pool of pages that hold one chunk each (in a shared region when local peers
    map it: `p2p_shared_memory`)."""
    codec = get_codec(config.tiers.cpu.codec)
    page_bytes = (raw_page_bytes(layout, page_tokens) if codec.zero_copy
                  else codec.max_encoded_size(layout, page_tokens))
    if config.p2p.enabled and config.p2p.shared_memory:  # local peers map it read-only (docs/p2p.md)
        from nencache.net.shared_pool import peer_pool

        pool = peer_pool(int(config.tiers.cpu.size), page_bytes, pin_memory=config.tiers.cpu.pin_memory)
    else:
        pool = MemoryPool(int(config.tiers.cpu.size), page_bytes, pin_memory=config.tiers.cpu.pin_memory)
    return MemoryTier(pool, layout, codec, policy=eviction() if eviction is not None else None)


def peer_tier(config: CacheConfig, namespace: str, memory: MemoryTier, layout: KVLayout) -> Tier:
    """The peer tier (`enable_p2p`): its endpoint serves `memory` to peers from now on, and evictions
    from `memory` are unpublished."""
    from nencache.tiers.peer.client import PeerClients
    from nencache.p2p.endpoint import PeerEndpoint
    from nencache.tiers.peer.index import PeerIndex
    from nencache.net.shared_pool import region_of
    from nencache.tiers.peer.tier import PeerTier

    if not config.p2p.index_url:
        raise ConfigError("enable_p2p needs p2p_index_url, the Redis URL (e.g. redis://127.0.0.1:6379) of the index "
                          "where peers publish the chunks they hold")
    if not config.tiers.cpu.enabled:
        raise ConfigError("enable_p2p serves chunks from the CPU pool, so it needs local_cpu: true")
    index = PeerIndex(config.p2p.index_url, namespace, ttl=config.p2p.ttl, timeout=config.tiers.remote.timeout,
                      key_prefix=config.tiers.remote.key_prefix)
    clients = PeerClients(namespace.encode("ascii"), timeout=config.tiers.remote.timeout, auth_token=config.auth_token,
                          shared_memory=config.p2p.shared_memory)
    endpoint = PeerEndpoint(memory, namespace, host=config.p2p.host, port=config.p2p.port,
                            auth_token=config.auth_token,
                            max_chunk_bytes=HEADER_SIZE + layout.nbytes(config.chunk_size),
                            region=region_of(memory.pool) if config.p2p.shared_memory else None)
    try:
        peer = PeerTier(index, endpoint, clients, ttl=config.p2p.ttl, mirror_keys=config.p2p.mirror_keys)
    except BaseException:
        endpoint.close()
        raise
    memory.on_evict = peer.evicted
    return peer


@dataclass(slots=True)
class Assembled:
    """A store and, with `enable_p2p`, its peer tier (also among the store's lower tiers)."""

    store: Store
    peer: Tier | None = None


def write_policy(config: CacheConfig) -> WritePolicy:
    """Backpressure for `write_wait_seconds`, then a drop per `write_drop`; at most `write_queue_chunks` queued."""
    return WritePolicy(config.write.wait_seconds, Drop(config.write.drop), config.write.queue_chunks)


def build_store(config: CacheConfig, layout: KVLayout, namespace: str, *, page_tokens: int | None = None,
                eviction: Eviction = None, lower: Sequence[tuple[Tier, str]] | None = None,
                warn: WarnOnce | None = None) -> Assembled:
    """The store `config` describes for one namespace (hex): memory tier, lower tiers (`lower` given:
    those instead), the peer tier with `enable_p2p`, and the write-behind."""
    memory = memory_tier(config, layout, page_tokens or config.chunk_size, eviction=eviction)
    pairs: list[tuple[Tier, str]] = []
    peer: Tier | None = None
    try:
        pairs = list(lower) if lower is not None else lower_tiers(config, namespace, eviction=eviction)
        if config.p2p.enabled:
            peer = peer_tier(config, namespace, memory, layout)
            pairs.append((peer, "raw"))
    except BaseException:
        for tier, _ in pairs:
            tier.close()
        memory.close()
        raise
    store = Store(memory, [LowerTier(tier, get_codec(codec)) for tier, codec in pairs], layout=layout,
                  policy=write_policy(config), keep_in_memory=config.tiers.cpu.enabled, io_threads=config.tiers.io_threads,
                  warn=warn)
    return Assembled(store, peer)
