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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from nencache.errors import ConfigError

log = logging.getLogger("nencache.config")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any, *, key: str = "size", gb_floats: bool = False) -> int:
    """Bytes from `"4GiB"`, `"512MB"`, `1048576`; with `gb_floats` a bare number means GB (LMCache style)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like '4GiB', '512MB' or a byte count, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ("gb" if gb_floats else "")
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"{key}: cannot read {value!r} as a size; write e.g. '4GiB', '512MB' or 1073741824")
        number, unit = float(match.group(1)), match.group(2).lower() or ("gb" if gb_floats else "")
    size = int(number * _UNITS[unit])
    if size < 0:
        raise ConfigError(f"{key}: a size cannot be negative ({value!r})")
    return size


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
    write_queue_chunks: int = 256
    io_threads: int = 4
    tenant: str = ""
    auth_token: str | None = None
    enable_p2p: bool = False
    p2p_index_url: str | None = None
    p2p_host: str = "127.0.0.1"
    p2p_port: int = 0
    server_host: str = "127.0.0.1"
    server_port: int = 5870
    server_admin_port: int | None = 5871  # None: no admin HTTP endpoint
    server_max_chunk_bytes: int | str = 8 * 2**20 + 64  # one chunk blob, header included; the pool page size
    server_max_request_bytes: int | str = "64MiB"  # the body of one frame
    server_max_keys: int = 1024  # keys in one frame
    server_max_connections: int = 1024
    server_max_namespaces: int = 64
    server_io_timeout: float = 30.0  # a frame or a reply that stalls longer closes its connection
    server_tls_cert: str | None = None
    server_tls_key: str | None = None

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
        if self.write_queue_chunks <= 0 or self.io_threads <= 0:
            raise ConfigError("write_queue_chunks and io_threads must be positive")

    def replace(self, **changes: Any) -> "CacheConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_TYPES: dict[str, Any] = {
    "chunk_size": int, "local_cpu": bool, "cpu_size": int, "save_unfull_chunk": bool,
    "pin_memory": (bool, type(None)), "cpu_codec": str, "disk_path": (str, type(None)), "disk_size": int,
    "disk_codec": str, "remote_url": (str, type(None)), "remote_codec": str, "remote_timeout": float,
    "remote_ttl": (int, type(None)), "remote_key_prefix": str, "write_queue_chunks": int, "io_threads": int,
    "tenant": str, "auth_token": (str, type(None)), "enable_p2p": bool, "p2p_index_url": (str, type(None)),
    "p2p_host": str, "p2p_port": int,
    "server_host": str, "server_port": int, "server_admin_port": (int, type(None)), "server_max_chunk_bytes": int,
    "server_max_request_bytes": int, "server_max_keys": int, "server_max_connections": int,
    "server_max_namespaces": int, "server_io_timeout": float, "server_tls_cert": (str, type(None)),
    "server_tls_key": (str, type(None)),
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


# --- LMCache compatibility (keys of lmcache/v1/config.py, LMCache 0.5.x, and older releases' names) ----------
# LMCache's remote_url schemes NenCache serves, and what they become. `lm://` is LMCache's own cache server: the
# NenCache server takes its place (`nencache serve`); `resp://` speaks the Redis protocol; `blackhole://`
# stores nothing, which is no remote tier at all.
LMCACHE_REMOTE_SCHEMES: dict[str, str | None] = {
    "redis": "redis", "rediss": "rediss", "unix": "unix", "redis-cluster": "redis-cluster",
    "valkey": "valkey", "resp": "redis", "lm": "nencache", "blackhole": None,
}
# LMCache remote backends without a NenCache equivalent: a config naming one is an error, not a silent miss.
LMCACHE_UNSUPPORTED_SCHEMES = (
    "redis-sentinel", "infinistore", "mooncakestore", "fs", "s3", "audit", "external", "mock", "azure", "gcs",
    "eic", "hf3fs", "sagemaker-hyperpod", "plugin", "bigtable", "couchbase", "shmfile", "benchmark", "hfbucket",
)
NENCACHE_REMOTE_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys", "redis-cluster", "nencache", "nencaches")


def _lmcache_remote_url(value: Any) -> str | None:
    """LMCache's `remote_url` as NenCache's: supported schemes mapped, the others a `ConfigError`."""
    if value in (None, "", "None", "null"):
        return None
    url = str(value)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    supported = ", ".join(f"{s}://" for s in NENCACHE_REMOTE_SCHEMES)
    if not sep:
        raise ConfigError(f"remote_url {url!r} has no scheme; use one of {supported}")
    if scheme in LMCACHE_UNSUPPORTED_SCHEMES:
        raise ConfigError(f"remote_url {url!r}: LMCache's {scheme}:// backend has no NenCache equivalent; "
                          f"supported schemes are {supported} (and LMCache's lm://, resp://, blackhole://)")
    if scheme not in LMCACHE_REMOTE_SCHEMES:
        return url  # a NenCache scheme; the tier factory checks it
    target = LMCACHE_REMOTE_SCHEMES[scheme]
    if target is None:
        log.warning("remote_url %r: blackhole:// discards every chunk; NenCache runs without a remote tier", url)
        return None
    if scheme == "lm":
        log.warning("remote_url %r: LMCache's server protocol is served by the NenCache server; run "
                    "`nencache serve` at that address (remote_url becomes nencache://%s)", url, rest)
    return f"{target}://{rest}"


def _lmcache_local_disk(value: Any) -> str | None:
    """LMCache's `local_disk`: a path, `file://` path, or a comma-separated list (NenCache uses one directory)."""
    if value in (None, "", "None", "null"):
        return None
    paths = [p.strip().removeprefix("file://") for p in str(value).split(",") if p.strip()]
    if len(paths) > 1:
        log.warning("local_disk lists %d directories; NenCache's disk tier uses one: %s", len(paths), paths[0])
    return paths[0] if paths else None


def _int_list(value: Any, key: str) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return [int(str(item).strip()) for item in items if str(item).strip()]
    except ValueError:
        raise ConfigError(f"{key}: expected a port or a comma-separated list of ports, got {value!r}") from None


def _first_port(value: Any, key: str) -> int:
    """LMCache's per-worker port lists (`p2p_init_ports`) -> NenCache's one port per process."""
    ports = _int_list(value, key)
    if not ports:
        raise ConfigError(f"{key}: no port given")
    if len(ports) > 1:
        log.warning("%s lists %d ports; NenCache listens on one port per process and uses %d", key, len(ports),
                    ports[0])
    return ports[0]


def _seconds(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number of seconds, got {value!r}") from None


def _host_port(value: Any, key: str) -> tuple[str, int]:
    """LMCache's old `distributed_url` ("host:port") -> (p2p_host, p2p_port)."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    return host, int(port)


def _serde_to_codec(serde: str) -> str:
    """LMCache's `remote_serde` -> NenCache's `remote_codec`. KIVI is a pass-through in LMCache (raw);
    CacheGen has no NenCache codec, so its chunks are stored raw (lossless) instead."""
    mapping = {"naive": "raw", "kivi": "raw", "cachegen": "raw"}
    if serde not in mapping:
        raise ConfigError(f"remote_serde: unknown value {serde!r}; LMCache's values are naive, kivi, cachegen")
    if serde == "cachegen":
        log.warning("remote_serde 'cachegen' has no NenCache equivalent; remote chunks are stored raw (lossless)")
    return mapping[serde]


# LMCache key -> (NenCache key, or several, and the value converter). Sizes in LMCache are GB floats. Keys with
# the same name and meaning in both (chunk_size, local_cpu, save_unfull_chunk, enable_p2p, p2p_host) need no alias.
ALIASES: dict[str, tuple[str | tuple[str, ...], Any]] = {
    "max_local_cpu_size": ("cpu_size", lambda v: parse_size(v, key="max_local_cpu_size", gb_floats=True)),
    "local_disk": ("disk_path", _lmcache_local_disk),
    "max_local_disk_size": ("disk_size", lambda v: parse_size(v, key="max_local_disk_size", gb_floats=True)),
    "remote_url": ("remote_url", _lmcache_remote_url),
    "remote_serde": ("remote_codec", lambda v: _serde_to_codec(str(v))),
    "blocking_timeout_secs": ("remote_timeout", lambda v: _seconds(v, "blocking_timeout_secs")),
    "p2p_init_ports": ("p2p_port", lambda v: _first_port(v, "p2p_init_ports")),
    "lookup_url": ("p2p_index_url", lambda v: None if v in (None, "") else str(v)),
    "controller_pull_url": ("p2p_index_url", lambda v: None if v in (None, "") else str(v)),
    "controller_url": ("p2p_index_url", lambda v: None if v in (None, "") else str(v)),
    "distributed_url": (("p2p_host", "p2p_port"), lambda v: _host_port(v, "distributed_url")),
}
# LMCache keys with no NenCache equivalent: accepted with one warning each, never silently ignored.
LMCACHE_IGNORED = {
    # storage and memory
    "local_cpu_use_hugepages", "reserve_local_cpu_size", "local_disk_path_sharding", "local_cpu_use_lazy",
    "cache_policy", "numa_mode", "retrieve_locations", "store_location", "weka_path", "audit_actual_remote_url",
    "storage_plugins", "remote_storage_plugins", "external_backends", "enable_lazy_memory_allocator",
    "pin_timeout_sec", "pin_check_interval_sec", "use_gds", "cufile_buffer_size", "extra_config",
    # saving, loading and lookups
    "use_layerwise", "save_decode_cache", "pre_caching_hash_algorithm", "enable_sparse_attention",
    "experimental_sampled_layerwise_lookup", "enable_async_loading", "store_async", "store_async_max_queue_size",
    "min_retrieve_tokens", "hit_miss_ratio", "lookup_timeout_ms", "lookup_server_worker_ids",
    "enable_scheduler_bypass_lookup", "external_lookup_client", "priority_limit", "error_handling",
    "use_gpu_connector_v3", "enable_kv_events", "enable_hidden_state_cache", "max_hidden_state_cpu_size",
    "enable_chunk_statistics",
    # P2P and controller (NenCache peers use p2p_host/p2p_port and p2p_index_url)
    "p2p_lookup_ports", "p2p_use_npu", "p2p_npu_buffer_size", "p2p_pull_mode", "p2p_delay_pull",
    "p2p_pull_pending_ttl", "transfer_channel", "enable_controller", "controller_reply_url", "lmcache_instance_id",
    # disaggregated prefill, NIXL, blending, process services
    "enable_pd", "enable_xpyd", "enable_nixl", "enable_blending", "mp_host", "mp_port",
    "runtime_plugin_locations", "plugin_locations", "script_allowed_imports", "run_script_api_enabled",
    "remote_config_url", "app_id", "py_enable_gc",
    # LMCache v0 names (LMCache v1 ignores them too)
    "local_device", "max_local_cache_size", "pipelined_backend",
    # LMCACHE_* environment switches that are not in its config file
    "force_skip_save", "log_level", "use_experimental", "server_url", "mq_timeout", "gpu_staging_buffer_bytes",
    "device_backend", "mp_transfer_mode", "offload_rpc_port", "kv_transfer_abi_version", "rocm_enable_batch_memcpy",
}
# Families of LMCache keys without an equivalent (PD, NIXL, blending, GDS, workers, telemetry, plugins, ...).
LMCACHE_IGNORED_PREFIXES = (
    "pd_", "nixl_", "blend_", "gds_", "maru_", "lazy_memory_", "chunk_statistics_", "internal_api_server_",
    "lmcache_worker_", "remote_fill_", "hidden_state", "ec_", "resp_", "controller_", "coordinator_", "plugin_",
    "runtime_plugin_", "request_telemetry_", "aerospike_", "musa_",
)
# LMCACHE_* variables about LMCache's own process (usage telemetry, banner): nothing to configure here.
LMCACHE_PROCESS_ENV = {"track_usage", "usage_context", "usage_track_interval", "usage_track_url", "disable_banner"}


def _is_lmcache_only(key: str) -> bool:
    return key in LMCACHE_IGNORED or key.startswith(LMCACHE_IGNORED_PREFIXES)


def _ignored_message(key: str, value: Any, origin: str) -> str:
    detail = f" (it holds {', '.join(map(str, value))})" if key == "extra_config" and isinstance(value, dict) else ""
    return f"LMCache setting {key!r} (from {origin}) has no NenCache equivalent and is ignored{detail}"


def _unquote(text: str) -> str:
    """LMCache strips one pair of matching quotes around environment values."""
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


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
    elif _is_lmcache_only(key):
        if warned is None or key not in warned:
            log.warning(_ignored_message(key, value, origin))
        if warned is not None:
            warned.add(key)
    else:
        raise ConfigError(f"unknown config key {key!r} in {origin}{_closest(key)}")


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
            text = _unquote(text) if prefix == "LMCACHE_" else text
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
