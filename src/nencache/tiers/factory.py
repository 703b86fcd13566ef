"""Build the byte tiers below memory that a `CacheConfig` asks for."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from nencache.config import CacheConfig
from nencache.errors import ConfigError
from nencache.policy.base import EvictionPolicy
from nencache.tiers.base import Tier

REDIS_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", "redis-cluster", "rediss-cluster",
                 "valkey-cluster", "valkeys-cluster")
SERVER_SCHEMES = ("nencache", "nencaches")


def build_lower_tiers(config: CacheConfig, namespace: str, *,
                      eviction: Callable[[], EvictionPolicy] | None = None) -> list[tuple[Tier, str]]:
    """(tier, codec name) pairs, fastest first: the disk tier, then the remote tier. `eviction` makes the
    disk tier's eviction policy (default LRU)."""
    tiers: list[tuple[Tier, str]] = []
    if config.disk_path:
        from nencache.tiers.disk import DiskTier

        tiers.append((DiskTier(config.disk_path, namespace, int(config.disk_size), io_threads=config.io_threads,
                               eviction=eviction() if eviction is not None else None),
                      config.disk_codec))
    if config.remote_url:
        tiers.append((build_remote_tier(config, namespace), config.remote_codec))
    return tiers


def build_remote_tier(config: CacheConfig, namespace: str) -> Tier:
    """The remote tier named by `remote_url`."""
    url = str(config.remote_url)
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        from nencache.tiers.redis import RedisTier

        return RedisTier(url, namespace, timeout=config.remote_timeout, ttl=config.remote_ttl,
                         key_prefix=config.remote_key_prefix)
    if scheme in SERVER_SCHEMES:
        from nencache.tiers.remote import ServerTier

        return ServerTier(url, namespace, timeout=config.remote_timeout, auth_token=config.auth_token,
                          shared_memory=config.remote_shared_memory)
    raise ConfigError(
        f"remote_url {url!r}: unsupported scheme {scheme!r}; use nencache://, nencaches://, redis://, rediss://, "
        "unix://, valkey:// or redis-cluster://"
    )
