"""LMCache's config keys as NenCache's flat keys.

Keys of lmcache/v1/config.py (LMCache 0.5.x) and older releases' names. Keys with the same name and
meaning in both need no alias; keys with no NenCache equivalent are accepted with one warning each.
"""

from __future__ import annotations

import logging
from typing import Any

from nencache.compat import serde, urls
from nencache.errors import ConfigError
from nencache.sizes import parse_size

log = logging.getLogger("nencache.config")


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


# LMCache key -> (NenCache key, or several, and the value converter). Sizes in LMCache are GB floats. Keys with
# the same name and meaning in both (chunk_size, local_cpu, save_unfull_chunk, enable_p2p, p2p_host) need no alias.
ALIASES: dict[str, tuple[str | tuple[str, ...], Any]] = {
    "max_local_cpu_size": ("cpu_size", lambda v: parse_size(v, key="max_local_cpu_size", gb_floats=True)),
    "local_disk": ("disk_path", _lmcache_local_disk),
    "max_local_disk_size": ("disk_size", lambda v: parse_size(v, key="max_local_disk_size", gb_floats=True)),
    "remote_url": ("remote_url", urls.remote_url),
    "remote_serde": ("remote_codec", serde.codec_name),
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


def is_lmcache_only(key: str) -> bool:
    """Whether `key` is an LMCache key without a NenCache equivalent (accepted with a warning)."""
    return key in LMCACHE_IGNORED or key.startswith(LMCACHE_IGNORED_PREFIXES)


def ignored_message(key: str, value: Any, origin: str) -> str:
    """The one warning for an ignored LMCache key."""
    detail = f" (it holds {', '.join(map(str, value))})" if key == "extra_config" and isinstance(value, dict) else ""
    return f"LMCache setting {key!r} (from {origin}) has no NenCache equivalent and is ignored{detail}"

