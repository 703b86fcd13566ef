"""The NenCache server: wire protocol, asyncio server, `ServerTier` client, admin HTTP endpoint.

Imports are lazy so that the client (`ServerTier`) does not load the server's modules.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ServerTier": "nencache.server.client",
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
