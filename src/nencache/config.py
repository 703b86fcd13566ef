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

    def __post_init__(self) -> None:
        self.cpu_size = parse_size(self.cpu_size, key="cpu_size")
        self.disk_size = parse_size(self.disk_size, key="disk_size")
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
}


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


# LMCache key -> (NenCache key, value converter). Sizes in LMCache are GB floats.
ALIASES: dict[str, tuple[str, Any]] = {
    "max_local_cpu_size": ("cpu_size", lambda v: parse_size(v, key="max_local_cpu_size", gb_floats=True)),
    "local_disk": ("disk_path", lambda v: None if v in (None, "", "None", "null") else str(v)),
    "max_local_disk_size": ("disk_size", lambda v: parse_size(v, key="max_local_disk_size", gb_floats=True)),
    "remote_serde": ("remote_codec", lambda v: _serde_to_codec(str(v))),
}
# LMCache keys with no NenCache equivalent: accepted with one warning each, never silently ignored.
LMCACHE_IGNORED = {
    "use_layerwise", "blocking_timeout_secs", "lmcache_instance_id", "enable_blending", "blend_recompute_ratio",
    "blend_min_tokens", "blend_special_str", "enable_controller", "controller_url", "lmcache_worker_port",
    "distributed_url", "error_handling", "external_lookup_client", "pre_caching_hash_algorithm",
    "extra_config", "numa_mode", "cache_policy", "enable_async_loading", "internal_api_server_enabled",
    "internal_api_server_port_start", "priority_limit", "py_enable_gc", "cache_policy", "gds_path",
    "cufile_buffer_size", "nixl_role", "nixl_receiver_host", "nixl_receiver_port", "nixl_buffer_size",
    "nixl_buffer_device", "enable_nixl", "enable_pd", "pd_role", "weka_path", "audit_actual_remove",
    "local_cpu_use_lazy", "enable_xpyd", "save_decode_cache", "min_retrieve_tokens", "remote_storage_plugins",
    "storage_plugins", "lookup_timeout_ms", "p2p_host", "p2p_init_ports", "p2p_lookup_ports",
}


def _serde_to_codec(serde: str) -> str:
    mapping = {"naive": "raw", "kivi": "int4", "cachegen": "cachegen"}
    if serde not in mapping:
        raise ConfigError(f"remote_serde: unknown value {serde!r}; LMCache's values are naive, kivi, cachegen")
    return mapping[serde]


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
    if int in kinds and name not in ("cpu_size", "disk_size"):
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
           from_env: bool) -> None:
    if key in ALIASES:
        target, convert = ALIASES[key]
        values[target], sources[target] = convert(value), f"{origin} (LMCache key {key})"
    elif key in _TYPES:
        values[key] = _coerce_env(key, value) if from_env and isinstance(value, str) else value
        sources[key] = origin
    elif key in LMCACHE_IGNORED:
        log.warning("LMCache setting %r (from %s) has no NenCache equivalent and is ignored", key, origin)
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
    file = path or env.get("NENCACHE_CONFIG_FILE") or env.get("LMCACHE_CONFIG_FILE")
    if file:
        for key, value in _read_yaml(Path(file)).items():
            _apply(values, sources, str(key), value, f"file {file}", from_env=False)
    for prefix in ("LMCACHE_", "NENCACHE_"):  # NENCACHE_ wins over LMCACHE_
        for name, text in sorted(env.items()):
            if not name.startswith(prefix) or name in ("NENCACHE_CONFIG_FILE", "LMCACHE_CONFIG_FILE"):
                continue
            key = name.removeprefix(prefix).lower()
            if prefix == "LMCACHE_" and key in ("track_usage", "log_level", "use_experimental", "usage_context"):
                continue  # LMCache process switches, not cache settings
            _apply(values, sources, key, text, f"env {name}", from_env=True)
    for key, value in (overrides or {}).items():
        _apply(values, sources, key, value, "argument", from_env=False)
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
