"""NenCache: a multi-tier KV cache for LLM inference. Text the model has read is never prefilled twice."""

from nencache.cache import KVCache
from nencache.config import CacheConfig
from nencache.config_loader import load_config
from nencache.errors import (
    ChunkMissingError,
    ClosedError,
    ConfigError,
    CorruptChunkError,
    LayoutError,
    NenCacheError,
    PoolExhaustedError,
    TierError,
)
from nencache.layout import KVLayout

__version__ = "0.1.0"

__all__ = [
    "CacheConfig", "ChunkMissingError", "ClosedError", "ConfigError", "CorruptChunkError", "KVCache", "KVLayout",
    "LayoutError", "NenCacheError", "PoolExhaustedError", "TierError", "load_config", "__version__",
]
