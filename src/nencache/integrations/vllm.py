"""vLLM integration: `NenCacheConnectorV1`, a `KVConnectorBase_V1` connector.

Enable it with::

    vllm serve MODEL --kv-transfer-config \\
        '{"kv_connector":"NenCacheConnectorV1","kv_connector_module_path":"nencache.integrations.vllm","kv_role":"kv_both"}'

The cache is configured like everywhere else (`NENCACHE_CONFIG_FILE` / `LMCACHE_CONFIG_FILE`, `NENCACHE_*`
/ `LMCACHE_*` variables); keys of `kv_connector_extra_config` prefixed `nencache.` or `lmcache.`
override them, and `"nencache.async_load": true` loads between engine steps instead of inside them.

This module imports without vLLM; vLLM is imported when the connector class is first used. The work
is done by plain classes: `vllm_scheduler.ConnectorScheduler`, `vllm_worker.ConnectorWorker` and
`paged.PagedKV`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping
from typing import Any

_ADAPTER_NAMES = ("NenCacheConnectorV1", "NenCacheConnectorMetadata")
_OWN_KEYS = ("async_load", "piece_tokens")


def __getattr__(name: str) -> Any:
    if name not in _ADAPTER_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        vllm_connector = importlib.import_module("nencache.integrations.vllm_connector")
    except ImportError as exc:
        raise ImportError(
            f"nencache.integrations.vllm.{name} needs vLLM, which could not be imported ({exc}). Install vLLM "
            "(pip install vllm) on a machine it supports; the plain classes in nencache.integrations.vllm_scheduler, "
            "vllm_worker and paged work without it."
        ) from exc
    return getattr(vllm_connector, name)


def request_salt(request: Any) -> str | None:
    """Everything besides the token ids that changes a request's KV: vLLM's `cache_salt`, the LoRA
    adapter and multimodal inputs (by their content hashes). None when there is nothing."""
    parts: list[str] = []
    if salt := getattr(request, "cache_salt", None):
        parts.append(f"salt={salt}")
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(f"lora={getattr(lora, 'lora_name', '')}:{getattr(lora, 'lora_int_id', '')}")
    for feature in getattr(request, "mm_features", None) or ():
        position = getattr(feature, "mm_position", None)
        where = f"@{getattr(position, 'offset', '')}+{getattr(position, 'length', '')}" if position else ""
        parts.append(f"mm={getattr(feature, 'identifier', '')}{where}")
    return "|".join(parts) or None


def connector_settings(extra_config: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `kv_connector_extra_config` into (config overrides, connector options).

    `nencache.<key>` and `lmcache.<key>` entries override the cache config; `nencache.async_load` and
    `nencache.piece_tokens` tune the connector; other entries belong to other connectors.
    """
    overrides: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in (extra_config or {}).items():
        prefix, dot, name = str(key).partition(".")
        if not dot or prefix not in ("nencache", "lmcache"):
            continue
        if prefix == "nencache" and name in _OWN_KEYS:
            options[name] = value
        else:
            overrides[name] = value
    return overrides, options


def model_identity(vllm_config: Any) -> tuple[str, str]:
    """(model id, fingerprint) for the cache namespace of a vLLM engine's model.

    The fingerprint covers the model's config, revision, dtype, KV cache dtype and quantization, so
    another checkpoint or precision never shares keys; the tensor-parallel shard is added by the worker.
    """
    model = getattr(vllm_config, "model_config", None)
    cache = getattr(vllm_config, "cache_config", None)
    hf_config = getattr(model, "hf_config", None)
    try:
        described = json.dumps(hf_config.to_dict(), sort_keys=True, default=str) if hf_config is not None else ""
    except Exception:
        described = repr(hf_config)
    fields = {
        "revision": getattr(model, "revision", None), "dtype": str(getattr(model, "dtype", "")),
        "quantization": getattr(model, "quantization", None), "kv_cache_dtype": getattr(cache, "cache_dtype", None),
        "config": hashlib.blake2b(described.encode(), digest_size=16).hexdigest(),
    }
    fingerprint = hashlib.blake2b(json.dumps(fields, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()
    return str(getattr(model, "model", "")), fingerprint
