"""`CacheConfig`: the one typed configuration, in sections, and its flat key names.

The config is nested: `config.tiers.cpu.size`, `config.tiers.remote.url`, `config.server.port`, ...
Each section is a slots dataclass whose field types are read from its annotations; a size field
(`Bytes`) also takes '4GiB'-style strings and holds bytes. Every leaf also has one flat key, the name
YAML files, `NENCACHE_*` variables, overrides and `CacheConfig(...)` keyword arguments use: the
section's prefix and the field's name (`cpu_size`, `remote_url`, `server_port`), or the name a field
declares (`local_cpu`, `enable_p2p`). `FLAT_KEYS` maps each flat key to its attribute path.

This module holds the schema only; `nencache.config_loader` reads files and the environment (with
LMCache's names, from `nencache.compat`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, ClassVar

from nencache.errors import ConfigError
from nencache.sizes import parse_size

EVICTION_POLICIES = ("lru", "leaf-lru", "s3fifo", "learned")  # what `eviction` accepts (nencache.policy builds them)
PREFETCH_POLICIES = ("off", "learned")


class _SizeMarker:
    """Marks an `int` field that also takes sizes like '4GiB' (`Bytes`)."""


Bytes = Annotated[int, _SizeMarker]

__all__ = [
    "Bytes", "CacheConfig", "CpuTierConfig", "DiskTierConfig", "FLAT_KEYS", "MetricsConfig", "P2PConfig",
    "RemoteTierConfig", "ServerConfig", "TiersConfig", "WriteConfig", "coerce_text", "parse_size",
]


def _flat(name: str) -> dict[str, str]:
    """Field metadata: the field's flat key, where it is not `<prefix>_<field>`."""
    return {"flat": name}


@dataclass(slots=True)
class CpuTierConfig:
    """The memory tier: the preallocated CPU pool."""

    flat_prefix: ClassVar[str] = "cpu"
    enabled: bool = field(default=True, metadata=_flat("local_cpu"))
    size: Bytes = 2 * 2**30
    pin_memory: bool | None = field(default=None, metadata=_flat("pin_memory"))  # None: pin when CUDA is available
    codec: str = "raw"

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(slots=True)
class DiskTierConfig:
    """The local disk tier (off while `path` is None)."""

    flat_prefix: ClassVar[str] = "disk"
    path: str | None = None
    size: Bytes = 16 * 2**30
    codec: str = "raw"

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path = str(self.path).removeprefix("file://") or None
        _check_fields(self)


@dataclass(slots=True)
class RemoteTierConfig:
    """The remote tier: Redis/Valkey or a NenCache server (off while `url` is None)."""

    flat_prefix: ClassVar[str] = "remote"
    url: str | None = None
    codec: str = "raw"
    timeout: float = 0.25
    ttl: int | None = None
    key_prefix: str = "nencache"
    shared_memory: bool = True  # a nencache:// server on this machine: copy chunks from its mapped pool

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.timeout <= 0:
            raise ConfigError(f"remote_timeout must be positive seconds, got {self.timeout}")


@dataclass(slots=True)
class TiersConfig:
    """The tiers below the engine, fastest first; the assembly module builds them in that order."""

    flat_prefix: ClassVar[str] = ""
    cpu: CpuTierConfig = field(default_factory=CpuTierConfig)
    disk: DiskTierConfig = field(default_factory=DiskTierConfig)
    remote: RemoteTierConfig = field(default_factory=RemoteTierConfig)
    io_threads: int = 8  # reads in flight per lower tier (a virtual or NVMe disk serves deeper queues faster)

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.io_threads <= 0:
            raise ConfigError(f"io_threads must be a positive number of threads, got {self.io_threads}")


@dataclass(slots=True)
class WriteConfig:
    """The write-behind that copies stored chunks to the tiers below memory."""

    flat_prefix: ClassVar[str] = "write"
    queue_chunks: int | None = None  # most writes waiting for the tiers below; None: the pool bounds them
    wait_seconds: float = 1.0  # a store waits this long for the write-behind when the pool is full of writes
    drop: str = "oldest"  # then gives up the oldest pending write ("oldest") or the new chunk ("newest")

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.queue_chunks is not None and self.queue_chunks <= 0:
            raise ConfigError(f"write_queue_chunks must be positive (or null: the pool bounds them), "
                              f"got {self.queue_chunks}")
        if not self.wait_seconds >= 0:
            raise ConfigError(f"write_wait_seconds must be 0 or more seconds, got {self.wait_seconds}")
        if self.drop not in ("oldest", "newest"):
            raise ConfigError(f"write_drop must be 'oldest' or 'newest', got {self.drop!r}")


@dataclass(slots=True)
class P2PConfig:
    """Sharing chunks with peer caches (docs/p2p.md)."""

    flat_prefix: ClassVar[str] = "p2p"
    enabled: bool = field(default=False, metadata=_flat("enable_p2p"))
    index_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    ttl: float = 30.0  # seconds an index entry lives unless its holder refreshes it
    shared_memory: bool = True  # peers on this machine copy chunks out of each other's pool (Linux memfd)
    mirror_keys: int = 65536  # keys in the local copy of the index (found without asking Redis); 0: no copy

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.mirror_keys < 0:
            raise ConfigError(f"p2p_mirror_keys must be 0 (no local copy of the index) or more, got {self.mirror_keys}")


@dataclass(slots=True)
class MetricsConfig:
    """This cache's own Prometheus endpoint (docs/monitoring.md)."""

    flat_prefix: ClassVar[str] = "metrics"
    port: int | None = None  # serve this cache's Prometheus metrics on this port (0: any free port)
    host: str = "127.0.0.1"  # the address `port` binds

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(slots=True)
class ServerConfig:
    """`nencache serve`: addresses, limits and timeouts."""

    flat_prefix: ClassVar[str] = "server"
    host: str = "127.0.0.1"
    port: int = 5870
    admin_port: int | None = 5871  # None: no admin HTTP endpoint
    max_chunk_bytes: Bytes = 8 * 2**20 + 64  # one chunk blob, header included; the pool page size
    max_request_bytes: Bytes = 64 * 2**20  # the body of one frame
    max_keys: int = 1024  # keys in one frame
    max_connections: int = 1024
    max_client_connections: int = 256  # open connections from one client address
    max_namespaces: int = 64
    io_timeout: float = 30.0  # a frame must arrive whole, and a reply be read, within this
    idle_timeout: float = 300.0  # a connection with no frame for this long is closed
    auth_timeout: float = 5.0  # a connection must authenticate within this (PING does not extend it)
    disk_read_wait: float = 0.1  # a request waits this long for the server's disk, then answers from memory
    tls_cert: str | None = None
    tls_key: str | None = None
    shared_memory: bool = True  # let clients on this machine map the pool read-only (Linux memfd)

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(slots=True, init=False)
class CacheConfig:
    """Everything that tunes a `KVCache`, in sections.

    Keyword arguments are flat keys (`CacheConfig(chunk_size=64, cpu_size="1GiB", remote_url=...)`),
    whole sections (`CacheConfig(server=ServerConfig(port=6000))`), or both: flat keys then change the
    given section. `replace` takes the same arguments.
    """

    flat_prefix: ClassVar[str] = ""
    chunk_size: int = 256
    save_unfull_chunk: bool = True
    tenant: str = ""
    auth_token: str | None = field(default=None, repr=False)
    eviction: str = "lru"  # the order tiers evict in: lru | leaf-lru | s3fifo | learned (docs/policies.md)
    prefetch: str = "off"  # off | learned: promote a conversation's chunks ahead of its predicted next turn
    tiers: TiersConfig = field(default_factory=TiersConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    p2p: P2PConfig = field(default_factory=P2PConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __init__(self, **values: Any) -> None:
        own = {f.name: f for f in fields(CacheConfig)}
        changes: dict[tuple[str, ...], Any] = {}
        for key, value in values.items():
            if key in own:
                continue
            if key not in FLAT_KEYS:
                raise ConfigError(f"unknown config key {key!r}{suggest(key, FLAT_KEYS)}")
            changes[FLAT_KEYS[key]] = value
        for name, f in own.items():
            if name in values:
                start = values[name]
            elif f.default_factory is not dataclasses.MISSING:
                start = f.default_factory()
            else:
                start = f.default
            sub = {path[1:]: v for path, v in changes.items() if path[0] == name}
            if name in _SECTIONS:
                _check_type(name, start, _kinds(CacheConfig)[name])
                start = _with_changes(start, sub)
            setattr(self, name, start)
        _check_fields(self)
        if self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be a positive number of tokens, got {self.chunk_size}")
        if self.eviction not in EVICTION_POLICIES:
            raise ConfigError(f"eviction must be one of {', '.join(EVICTION_POLICIES)}; got {self.eviction!r}")
        if self.prefetch not in PREFETCH_POLICIES:
            raise ConfigError(f"prefetch must be one of {', '.join(PREFETCH_POLICIES)}; got {self.prefetch!r}")

    def replace(self, **changes: Any) -> CacheConfig:
        """A copy with flat keys or whole sections changed."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Every flat key and its value, in declaration order (`CacheConfig(**config.as_dict())` copies it)."""
        out: dict[str, Any] = {}
        for key, path in FLAT_KEYS.items():
            value: Any = self
            for name in path:
                value = getattr(value, name)
            out[key] = value
        return out


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(CacheConfig)  # type: ignore[misc]
                              if f.default_factory is not dataclasses.MISSING}


def _with_changes(section: Any, changes: dict[tuple[str, ...], Any]) -> Any:
    """`section` with the leaves at these paths (relative to it) replaced, each sub-section rebuilt once."""
    if not changes:
        return section
    direct = {path[0]: value for path, value in changes.items() if len(path) == 1}
    for name in {path[0] for path in changes if len(path) > 1}:
        inner = {path[1:]: value for path, value in changes.items() if len(path) > 1 and path[0] == name}
        direct[name] = _with_changes(direct.get(name, getattr(section, name)), inner)
    return dataclasses.replace(section, **direct)


# --- types, read from the annotations ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Kind:
    """What a field accepts: its types, whether None is allowed, and whether it is a size."""

    types: tuple[type, ...]
    size: bool = False

    def describe(self) -> str:
        return " or ".join("null" if t is type(None) else t.__name__ for t in self.types)


@functools.cache
def _kinds(cls: type) -> dict[str, _Kind]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: _kind_of(hints[f.name]) for f in fields(cls)}


def _kind_of(hint: Any) -> _Kind:
    size = typing.get_origin(hint) is Annotated and _SizeMarker in typing.get_args(hint)[1:]
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _Kind(tuple(typing.get_args(hint)), size)
    return _Kind((hint,), size)


def _flat_key(cls: type, f: dataclasses.Field[Any]) -> str:
    prefix: str = getattr(cls, "flat_prefix")
    return f.metadata.get("flat") or (f"{prefix}_{f.name}" if prefix else f.name)


def _check_fields(obj: Any) -> None:
    """Parse the size fields of `obj` and check every field against its annotation (errors name flat keys)."""
    cls = type(obj)
    for f in fields(cls):
        if cls is CacheConfig and f.name in _SECTIONS:
            continue  # checked by their own __post_init__
        kind = _kinds(cls)[f.name]
        key = _flat_key(cls, f)
        value = getattr(obj, f.name)
        if kind.size and value is not None:
            value = parse_size(value, key=key)
            setattr(obj, f.name, value)
        _check_type(key, value, kind)


def _check_type(key: str, value: Any, kind: _Kind) -> None:
    if float in kind.types and isinstance(value, int) and not isinstance(value, bool):
        return
    if bool not in kind.types and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {kind.describe()}, got a boolean {value!r}")
    if not isinstance(value, kind.types):
        raise ConfigError(f"{key}: expected {kind.describe()}, got {type(value).__name__} {value!r}")


def _flat_keys(cls: type, path: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for f in fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            out |= _flat_keys(f.default_factory, (*path, f.name))  # type: ignore[arg-type]
        else:
            out[_flat_key(cls, f)] = (*path, f.name)
    return out


FLAT_KEYS: dict[str, tuple[str, ...]] = _flat_keys(CacheConfig)
"""Every flat key -> its attribute path in `CacheConfig` (`"cpu_size"` -> `("tiers", "cpu", "size")`)."""


def _leaf_kind(key: str) -> _Kind:
    *parents, name = FLAT_KEYS[key]
    cls: type = CacheConfig
    for parent in parents:
        cls = {f.name: f.default_factory for f in fields(cls)}[parent]  # type: ignore[assignment]
    return _kinds(cls)[name]


def coerce_text(key: str, text: str) -> Any:
    """An environment string as the typed value the flat key `key` declares."""
    kind = _leaf_kind(key)
    lowered = text.strip().lower()
    if type(None) in kind.types and lowered in ("", "none", "null"):
        return None
    if bool in kind.types:
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {text!r}")
    if kind.size:
        return text
    if int in kind.types:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if float in kind.types:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    return text


def suggest(key: str, candidates: typing.Iterable[str]) -> str:
    """'; did you mean ...?' for the closest candidate, else the list of flat keys."""
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(FLAT_KEYS))}"
