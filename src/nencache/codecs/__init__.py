"""Codecs: chunk tensor <-> the shared byte format. `get_codec(name)` finds one by name."""

from __future__ import annotations

from nencache.codecs.base import Codec
from nencache.codecs.raw import RawCodec
from nencache.errors import ConfigError

_CODECS: dict[str, type] = {"raw": RawCodec}


def get_codec(name: str) -> Codec:
    """Return a codec by name (`"raw"`, ...)."""
    if name not in _CODECS:
        raise ConfigError(f"unknown codec {name!r}; available: {', '.join(sorted(_CODECS))}")
    return _CODECS[name]()


__all__ = ["Codec", "RawCodec", "get_codec"]
