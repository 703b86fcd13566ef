"""`ServerSettings`: what a NenCache server runs with, taken from a `CacheConfig` and command-line flags."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from nencache.config import CacheConfig, parse_size
from nencache.config_loader import LoadedConfig
from nencache.errors import ConfigError
from nencache.net.protocol import Limits

EMBEDDED_POOL = "1GiB"
EMBEDDED_DISK = "8GiB"


@dataclass(frozen=True, slots=True)
class PageBudgets:
    """Most pool pages held at once by GET replies on the wire and by PUT bodies being received, each shared
    fairly across connections and client addresses (see `nencache.server.budget`). Pending disk writes may
    hold the rest: the pool is their queue."""

    replies: int
    bodies: int


@dataclass(slots=True)
class ServerSettings:
    """Addresses, limits, the memory pool and the optional disk tier of one server."""

    host: str = "127.0.0.1"
    port: int = 5870
    admin_port: int | None = 5871
    auth_token: str | None = None
    pool_bytes: int = 1 << 30
    max_chunk_bytes: int = 8 * 2**20 + 64
    max_request_bytes: int = 64 * 2**20
    max_keys: int = 1024
    max_connections: int = 1024
    max_client_connections: int = 256  # open connections from one client address
    max_namespaces: int = 64
    io_timeout: float = 30.0  # a frame must arrive whole, and a reply be read whole, within this
    idle_timeout: float = 300.0  # a connection with no frame (and no reply in flight) for this long is closed
    auth_timeout: float = 5.0  # a connection to a server with a token must authenticate within this
    tls_cert: str | None = None
    tls_key: str | None = None
    disk_path: str | None = None
    disk_bytes: int = 16 * 2**30
    io_threads: int = 4
    disk_drop: str = "oldest"  # a pool full of disk writes gives up the oldest one, or ("newest") refuses a PUT
    disk_read_wait: float = 0.1  # a request waits this long for the disk tier, then answers from memory alone
    shared_memory: bool = True

    def __post_init__(self) -> None:
        if self.max_chunk_bytes < 64 or self.max_request_bytes < self.max_chunk_bytes:
            raise ConfigError("server_max_request_bytes must be at least server_max_chunk_bytes (>= 64 bytes)")
        if self.pool_bytes < self.max_chunk_bytes:
            raise ConfigError(f"cpu_size ({self.pool_bytes} bytes) must hold at least one chunk of "
                              f"server_max_chunk_bytes ({self.max_chunk_bytes}); raise cpu_size")
        if min(self.max_keys, self.max_connections, self.max_client_connections, self.max_namespaces) < 1:
            raise ConfigError("server_max_keys, server_max_connections, server_max_client_connections and "
                              "server_max_namespaces must be >= 1")
        if self.disk_drop not in ("oldest", "newest"):
            raise ConfigError(f"write_drop must be 'oldest' or 'newest', got {self.disk_drop!r}")
        for name, value in (("server_io_timeout", self.io_timeout), ("server_idle_timeout", self.idle_timeout),
                            ("server_auth_timeout", self.auth_timeout), ("server_disk_read_wait", self.disk_read_wait)):
            if not value > 0:
                raise ConfigError(f"{name} must be positive seconds, got {value}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both server_tls_cert and server_tls_key (PEM files)")
        if not is_loopback(self.host) and not self.auth_token:
            raise ConfigError(
                f"refusing to serve on {self.host}, which is reachable from other machines, without an auth "
                "token; set auth_token in the config or NENCACHE_AUTH_TOKEN (clients send the same token), "
                "or bind 127.0.0.1"
            )

    @property
    def limits(self) -> Limits:
        return Limits(self.max_chunk_bytes, self.max_request_bytes, self.max_keys)

    def page_budgets(self, pages: int) -> PageBudgets:
        """How many of the pool's `pages` replies on the wire and PUT bodies being received may hold."""
        return PageBudgets(replies=max(self.limits.max_get_keys, pages // 2), bodies=max(1, pages // 4))

    @classmethod
    def from_config(cls, config: CacheConfig, *, host: str | None = None, port: int | None = None,
                    admin_port: int | None = None) -> ServerSettings:
        """Settings from `config`; `host`/`port`/`admin_port` given here win (a negative admin_port: no admin)."""
        admin = config.server.admin_port if admin_port is None else admin_port
        return cls(
            host=host or config.server.host,
            port=config.server.port if port is None else port,
            admin_port=None if admin is None or admin < 0 else admin,
            auth_token=config.auth_token or None,
            pool_bytes=int(config.tiers.cpu.size),
            max_chunk_bytes=int(config.server.max_chunk_bytes),
            max_request_bytes=int(config.server.max_request_bytes),
            max_keys=config.server.max_keys,
            max_connections=config.server.max_connections,
            max_client_connections=config.server.max_client_connections,
            max_namespaces=config.server.max_namespaces,
            io_timeout=config.server.io_timeout,
            idle_timeout=config.server.idle_timeout,
            auth_timeout=config.server.auth_timeout,
            tls_cert=config.server.tls_cert,
            tls_key=config.server.tls_key,
            disk_path=config.tiers.disk.path,
            disk_bytes=int(config.tiers.disk.size),
            io_threads=config.tiers.io_threads,
            disk_drop=config.write.drop,
            disk_read_wait=config.server.disk_read_wait,
            shared_memory=config.server.shared_memory,
        )

    def tls_context(self) -> ssl.SSLContext | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate {self.tls_cert} / key {self.tls_key}: {exc}") from None
        return context


def embedded_defaults(loaded: LoadedConfig) -> tuple[CacheConfig, str]:
    """The config `nencache serve` runs with when no config file is given, and a line describing it.

    Keys set in the environment are kept; otherwise the pool is 1 GiB and, when the disk tier is
    available, a disk tier lives in the user's cache directory.
    """
    config, sources = loaded.config, loaded.sources
    changes: dict[str, object] = {}
    if "cpu_size" not in sources:
        changes["cpu_size"] = parse_size(EMBEDDED_POOL)
    if "disk_path" not in sources and disk_tier_available():
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        changes["disk_path"] = str(base / "nencache" / "server")
        if "disk_size" not in sources:
            changes["disk_size"] = parse_size(EMBEDDED_DISK)
    config = config.replace(**changes)
    disk = f"disk tier at {config.tiers.disk.path} ({_gib(int(config.tiers.disk.size))})" if config.tiers.disk.path else "no disk tier"
    line = (f"no config file given: running the embedded defaults ({_gib(int(config.tiers.cpu.size))} memory pool, "
            f"{disk}); pass --config FILE to choose")
    return config, line


def disk_tier_available() -> bool:
    try:
        from nencache.tiers.disk.tier import DiskTier  # noqa: F401
    except ImportError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def _gib(size: int) -> str:
    return f"{size / 2**30:g} GiB"
