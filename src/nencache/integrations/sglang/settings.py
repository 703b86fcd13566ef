"""NenCache settings in SGLang's `--hicache-storage-backend-extra-config` (plain Python)."""

from __future__ import annotations

import logging
from typing import Any

from nencache.config_loader import is_config_key

log = logging.getLogger("nencache.sglang")

# The entries SGLang's backend factory reads itself.
_FACTORY_KEYS = ("backend_name", "module_path", "class_name", "interface_v1")


def config_overrides(extra: dict[str, Any]) -> dict[str, Any]:
    """NenCache settings in `--hicache-storage-backend-extra-config`: `nencache.<key>` / `lmcache.<key>`,
    or a NenCache key as it is. Other entries are logged, one line each, and ignored."""
    overrides: dict[str, Any] = {}
    for key, value in extra.items():
        if key in _FACTORY_KEYS:
            continue
        prefixed = key.startswith(("nencache.", "lmcache."))
        name = key.split(".", 1)[1] if prefixed else key
        if prefixed or is_config_key(name):
            overrides[name] = value
        else:
            log.warning("--hicache-storage-backend-extra-config entry %r is not a NenCache setting; it is ignored "
                        "(NenCache settings are its config keys, optionally prefixed nencache. or lmcache.)", key)
    return overrides
