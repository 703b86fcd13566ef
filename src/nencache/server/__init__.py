"""`nencache serve`: the asyncio chunk server, its connections and its admin HTTP endpoint.

The wire protocol lives in `nencache.net`, the client tier (`ServerTier`) in `nencache.tiers.remote`.
Imports are lazy so that `import nencache.server` loads nothing until a name is used.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "NenCacheServer": "nencache.server.server",
    "BackgroundServer": "nencache.server.server",
    "serve": "nencache.server.server",
    "ServerSettings": "nencache.server.settings",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nencache.server' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
