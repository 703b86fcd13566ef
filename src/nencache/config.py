"""`CacheConfig`: the one typed configuration, and how it is loaded.

Precedence, lowest first: defaults < YAML file (`--config`, `NENCACHE_CONFIG_FILE` or
`LMCACHE_CONFIG_FILE`) < environment (`NENCACHE_<KEY>`, `LMCACHE_<KEY>`) < explicit overrides.
LMCache's key names work everywhere as aliases (see `ALIASES`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from nencache.errors import ConfigError
from nencache.lmcache_compat import ALIASES, LMCACHE_PROCESS_ENV, ignored_message, is_lmcache_only, unquote
from nencache.sizes import parse_size

log = logging.getLogger("nencache.config")

EVICTION_POLICIES = ("lru", "leaf-lru", "s3fifo", "learned")  # what `eviction` accepts (nencache.policy builds them)
PREFETCH_POLICIES = ("off", "learned")

__all__ = ["CacheConfig", "LoadedConfig", "is_config_key", "load_config", "parse_size"]


@dataclass(slots=True)
class CacheConfig:
    """Everything that tunes a `KVCache`. Sizes accept '4GiB'-style strings and are stored as bytes."""

    chunk_size: int = 256
    local_cpu: bool = True
    cpu_size: int | str = "2GiB"
    save_unfull_chunk: bool = True
    pin_memory: bool | None = None  # None: pin when CUDA is available
    cpu_codec: str = "raw"
    disk_path: str | None = None
    disk_size: int | str = "16GiB"
    disk_codec: str = "raw"
    remote_url: str | None = None
    remote_codec: str = "raw"
    remote_timeout: float = 0.25
    remote_ttl: int | None = None
    remote_key_prefix: str = "nencache"
    remote_shared_memory: bool = True  # a nencache:// server on this machine: copy chunks from its mapped pool
    write_queue_chunks: int | None = None  # most writes waiting for the tiers below; None: the pool bounds them
    write_wait_seconds: float = 1.0  # a store waits this long for the write-behind when the pool is full of writes
    write_drop: str = "oldest"  # then gives up the oldest pending write ("oldest") or the new chunk ("newest")
    io_threads: int = 8  # reads in flight per lower tier (a virtual or NVMe disk serves deeper queues faster)
    eviction: str = "lru"  # the order tiers evict in: lru | leaf-lru | s3fifo | learned (docs/policies.md)
    prefetch: str = "off"  # off | learned: promote a conversation's chunks ahead of its predicted next turn
    tenant: str = ""
    auth_token: str | None = None
    enable_p2p: bool = False
    p2p_index_url: str | None = None
    p2p_host: str = "127.0.0.1"
    p2p_port: int = 0
    p2p_ttl: float = 30.0  # seconds an index entry lives unless its holder refreshes it
    p2p_shared_memory: bool = True  # peers on this machine copy chunks out of each other's pool (Linux memfd)
    metrics_port: int | None = None  # serve this cache's Prometheus metrics on this port (0: any free port)
    metrics_host: str = "127.0.0.1"  # the address metrics_port binds
    server_host: str = "127.0.0.1"
    server_port: int = 5870
    server_admin_port: int | None = 5871  # None: no admin HTTP endpoint
    server_max_chunk_bytes: int | str = 8 * 2**20 + 64  # one chunk blob, header included; the pool page size
    server_max_request_bytes: int | str = "64MiB"  # the body of one frame
    server_max_keys: int = 1024  # keys in one frame
    server_max_connections: int = 1024
    server_max_client_connections: int = 256  # open connections from one client address
    server_max_namespaces: int = 64
    server_io_timeout: float = 30.0  # a frame must arrive whole, and a reply be read, within this
    server_idle_timeout: float = 300.0  # a connection with no frame for this long is closed
    server_auth_timeout: float = 5.0  # a connection must authenticate within this (PING does not extend it)
    server_disk_read_wait: float = 0.1  # a request waits this long for the server's disk, then answers from memory
    server_tls_cert: str | None = None
    server_tls_key: str | None = None
    server_shared_memory: bool = True  # let clients on this machine map the pool read-only (Linux memfd)

    def __post_init__(self) -> None:
        for key in _SIZE_KEYS:
            setattr(self, key, parse_size(getattr(self, key), key=key))
        if self.disk_path is not None:
            self.disk_path = str(self.disk_path).removeprefix("file://") or None
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), _TYPES[f.name])
        if self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be a positive number of tokens, got {self.chunk_size}")
        if self.remote_timeout <= 0:
            raise ConfigError(f"remote_timeout must be positive seconds, got {self.remote_timeout}")
        if (self.write_queue_chunks is not None and self.write_queue_chunks <= 0) or self.io_threads <= 0:
            raise ConfigError("write_queue_chunks (or null: the pool) and io_threads must be positive")
        if not self.write_wait_seconds >= 0:
            raise ConfigError(f"write_wait_seconds must be 0 or more seconds, got {self.write_wait_seconds}")
        if self.write_drop not in ("oldest", "newest"):
            raise ConfigError(f"write_drop must be 'oldest' or 'newest', got {self.write_drop!r}")
        if self.eviction not in EVICTION_POLICIES:
            raise ConfigError(f"eviction must be one of {', '.join(EVICTION_POLICIES)}; got {self.eviction!r}")
        if self.prefetch not in PREFETCH_POLICIES:
            raise ConfigError(f"prefetch must be one of {', '.join(PREFETCH_POLICIES)}; got {self.prefetch!r}")

    def replace(self, **changes: Any) -> "CacheConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_TYPES: dict[str, Any] = {
    "chunk_size": int, "local_cpu": bool, "cpu_size": int, "save_unfull_chunk": bool,
    "pin_memory": (bool, type(None)), "cpu_codec": str, "disk_path": (str, type(None)), "disk_size": int,
    "disk_codec": str, "remote_url": (str, type(None)), "remote_codec": str, "remote_timeout": float,
    "remote_ttl": (int, type(None)), "remote_key_prefix": str, "remote_shared_memory": bool,
    "write_queue_chunks": (int, type(None)), "write_wait_seconds": float, "write_drop": str, "io_threads": int,
    "tenant": str, "auth_token": (str, type(None)), "enable_p2p": bool, "p2p_index_url": (str, type(None)),
    "p2p_host": str, "p2p_port": int, "p2p_ttl": float, "p2p_shared_memory": bool, "metrics_port": (int, type(None)),
    "metrics_host": str,
    "server_host": str, "server_port": int, "server_admin_port": (int, type(None)), "server_max_chunk_bytes": int,
    "server_max_request_bytes": int, "server_max_keys": int, "server_max_connections": int,
    "server_max_client_connections": int, "server_idle_timeout": float, "server_auth_timeout": float,
    "server_disk_read_wait": float,
    "server_max_namespaces": int, "server_io_timeout": float, "server_tls_cert": (str, type(None)),
    "server_tls_key": (str, type(None)), "server_shared_memory": bool, "eviction": str, "prefetch": str,
}
_SIZE_KEYS = ("cpu_size", "disk_size", "server_max_chunk_bytes", "server_max_request_bytes")


def _check_type(name: str, value: Any, expected: Any) -> None:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return
    if bool not in kinds and isinstance(value, bool):
        raise ConfigError(f"{name}: expected {_kind_names(kinds)}, got a boolean {value!r}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{name}: expected {_kind_names(kinds)}, got {type(value).__name__} {value!r}")


def _kind_names(kinds: tuple[type, ...]) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _closest(key: str) -> str:
    candidates = list(_TYPES) + list(ALIASES)
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(_TYPES))}"


def _coerce_env(name: str, text: str) -> Any:
    """Env strings to typed values, guided by the key's declared type."""
    kinds = _TYPES[name] if isinstance(_TYPES[name], tuple) else (_TYPES[name],)
    lowered = text.strip().lower()
    if type(None) in kinds and lowered in ("", "none", "null"):
        return None
    if bool in kinds:
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {text!r}")
    if int in kinds and name not in _SIZE_KEYS:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {text!r}") from None
    if float in kinds:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {text!r}") from None
    return text


@dataclass(slots=True)
class LoadedConfig:
    """A config and, for every key that is not a default, where its value came from."""

    config: CacheConfig
    sources: dict[str, str] = field(default_factory=dict)


def _apply(values: dict[str, Any], sources: dict[str, str], key: str, value: Any, origin: str,
           from_env: bool, warned: set[str] | None = None) -> None:
    if key in ALIASES:
        target, convert = ALIASES[key]
        targets, converted = ((target,), (convert(value),)) if isinstance(target, str) else (target, convert(value))
        for name, item in zip(targets, converted):
            values[name] = item
            sources[name] = origin if name == key else f"{origin} (LMCache key {key})"
    elif key in _TYPES:
        values[key] = _coerce_env(key, value) if from_env and isinstance(value, str) else value
        sources[key] = origin
    elif is_lmcache_only(key):
        if warned is None or key not in warned:
            log.warning(ignored_message(key, value, origin))
        if warned is not None:
            warned.add(key)
    else:
        raise ConfigError(f"unknown config key {key!r} in {origin}{_closest(key)}")


def is_config_key(key: str, *, lmcache: bool = False) -> bool:
    """Whether `key` is a `CacheConfig` field or, with `lmcache`, any key of LMCache's config that
    `load_config` takes (an alias of a NenCache key, or an LMCache-only key it accepts with a warning)."""
    return key in _TYPES or (lmcache and (key in ALIASES or is_lmcache_only(key)))


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """Build the effective config from defaults, a YAML file, the environment and explicit overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    warned: set[str] = set()
    file = path or env.get("NENCACHE_CONFIG_FILE") or env.get("LMCACHE_CONFIG_FILE")
    if file:
        for key, value in _read_yaml(Path(file)).items():
            _apply(values, sources, str(key), value, f"file {file}", from_env=False, warned=warned)
    for prefix in ("LMCACHE_", "NENCACHE_"):  # NENCACHE_ wins over LMCACHE_
        for name, text in sorted(env.items()):
            if not name.startswith(prefix) or name in ("NENCACHE_CONFIG_FILE", "LMCACHE_CONFIG_FILE"):
                continue
            key = name.removeprefix(prefix).lower()
            if prefix == "LMCACHE_" and key in LMCACHE_PROCESS_ENV:
                continue  # LMCache's own telemetry and banner, not cache settings
            text = unquote(text) if prefix == "LMCACHE_" else text
            _apply(values, sources, key, text, f"env {name}", from_env=True, warned=warned)
    for key, value in (overrides or {}).items():
        _apply(values, sources, key, value, "argument", from_env=False, warned=warned)
    try:
        return LoadedConfig(CacheConfig(**values), sources)
    except TypeError as exc:  # pragma: no cover - every key was validated above
        raise ConfigError(str(exc)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data
