"""What the vLLM connector reads from vLLM's config: its own options, cache overrides, identities.

Plain Python: nothing here imports vLLM, so it is tested without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from nencache.config_loader import is_config_key
from nencache.errors import ConfigError

log = logging.getLogger("nencache.vllm")


@dataclass(frozen=True, slots=True)
class ConnectorOptions:
    """How the connector behaves inside vLLM (the cache itself is configured by `CacheConfig`)."""

    async_load: bool = False  # load between engine steps (the request waits, the batch does not)
    piece_tokens: int = 0  # async loads stop between pieces of this many tokens (0: one chunk)
    save_decode: bool = True  # when a request finishes, also store the KV of its generated tokens
    lookup_wait_ms: float = 20.0  # how long the scheduler waits for a lookup before answering "not yet"
    pin_seconds: float = 600.0  # a lookup's pinned chunks are released after this long without a load


_OPTION_TYPES = {f.name: f.type for f in fields(ConnectorOptions)}
_LMCACHE_OPTIONS = {"save_decode_cache": "save_decode"}  # LMCache connector settings that are options here


def connector_settings(extra_config: Mapping[str, Any] | None) -> tuple[dict[str, Any], ConnectorOptions]:
    """Split `kv_connector_extra_config` into (cache config overrides, connector options).

    Accepted keys: NenCache's config keys (`disk_path`, `cpu_size`, ...) and the connector options
    (`async_load`, ...), each with or without a `nencache.` prefix, and LMCache's keys with an
    `lmcache.` prefix (as LMCache's connector reads them). A `nencache.` key NenCache does not know is
    an error; any other entry is left to other connectors and named in one warning.
    """
    overrides: dict[str, Any] = {}
    options: dict[str, Any] = {}
    unused: list[str] = []
    for raw_key, value in (extra_config or {}).items():
        key = str(raw_key)
        prefix, dot, name = key.partition(".")
        if not dot:
            prefix, name = "", key
        if prefix in ("", "nencache") and name in _OPTION_TYPES:
            options[name] = _option(name, value)
        elif prefix == "lmcache" and name in _LMCACHE_OPTIONS:
            options[_LMCACHE_OPTIONS[name]] = _option(_LMCACHE_OPTIONS[name], value)
        elif prefix in ("", "nencache", "lmcache") and is_config_key(name, lmcache=prefix == "lmcache"):
            overrides[name] = value
        elif prefix == "nencache":
            raise ConfigError(f"kv_connector_extra_config has {key!r}, which NenCache does not know; valid keys are "
                              f"NenCache's config keys and {', '.join(sorted(_OPTION_TYPES))}")
        else:
            unused.append(key)
    if unused:
        log.warning("NenCache ignores kv_connector_extra_config entries %s: they are neither NenCache config keys "
                    "nor connector options", ", ".join(sorted(unused)))
    return overrides, ConnectorOptions(**options)


def _option(name: str, value: Any) -> Any:
    kind = {"bool": bool, "int": int, "float": float}[str(_OPTION_TYPES[name])]
    if kind is bool:
        if isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ConfigError(f"connector option {name} must be true or false, got {value!r}")
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"connector option {name} must be a number, got {value!r}") from None
    if converted < 0:
        raise ConfigError(f"connector option {name} must not be negative, got {value!r}")
    return converted


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


def model_identity(vllm_config: Any) -> tuple[str, str]:
    """(model id, fingerprint) for the cache namespace of a vLLM engine's model.

    The fingerprint covers the model's config, revision, dtype, KV cache dtype and quantization, so
    another checkpoint or precision never shares keys; the parallel shard is added by the worker.
    """
    model = getattr(vllm_config, "model_config", None)
    cache = getattr(vllm_config, "cache_config", None)
    hf_config = getattr(model, "hf_config", None)
    try:
        described = json.dumps(hf_config.to_dict(), sort_keys=True, default=str) if hf_config is not None else ""
    except Exception:
        described = repr(hf_config)
    fields_ = {
        "revision": getattr(model, "revision", None), "dtype": str(getattr(model, "dtype", "")),
        "quantization": getattr(model, "quantization", None), "kv_cache_dtype": getattr(cache, "cache_dtype", None),
        "config": hashlib.blake2b(described.encode(), digest_size=16).hexdigest(),
    }
    fingerprint = hashlib.blake2b(json.dumps(fields_, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()
    return str(getattr(model, "model", "")), fingerprint
