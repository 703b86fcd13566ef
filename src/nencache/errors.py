"""The one exception hierarchy of NenCache.

Every error a user can cause or meet derives from `NenCacheError`, and its message says what to do.
"""

from __future__ import annotations


class NenCacheError(Exception):
    """Base of every error NenCache raises on purpose."""


class ConfigError(NenCacheError, ValueError):
    """A configuration key or value is unknown or invalid."""


class LayoutError(NenCacheError, ValueError):
    """A KV tensor or token sequence does not match the cache's layout (shape, dtype, length)."""


class TierError(NenCacheError):
    """A storage tier failed (unreachable, full, I/O error). Callers above the tier treat it as a miss."""


class CorruptChunkError(TierError):
    """Bytes that came back from a tier fail their header or checksum check."""


class PoolExhaustedError(NenCacheError):
    """The memory pool has no free page and every used page is pinned by a reader."""


class ClosedError(NenCacheError):
    """The cache (or tier) was closed and can no longer be used."""


class ChunkMissingError(NenCacheError, KeyError):
    """`retrieve` was asked for tokens that are not (or no longer) cached."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TraceError(NenCacheError, ValueError):
    """A request trace given to the simulator cannot be read (its message names the file and line)."""
