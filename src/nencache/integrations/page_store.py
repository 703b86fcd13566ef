"""`PageStore`: KV pages under engine-chosen string keys, in NenCache's tiers.

Engines that name pages themselves (SGLang's HiCache hashes each page with its prefix) cannot use
`KVCache`'s token-keyed API. A `PageStore` keeps such pages as ordinary chunks
`[layers, 2, page_tokens, kv_heads, head_dim]` in a memory tier and the byte tiers below it (disk,
Redis, a NenCache server), under 16-byte keys derived from the page name and a namespace.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from nencache.codecs import Codec, get_codec
from nencache.config import CacheConfig
from nencache.copy import copy_into
from nencache.errors import CorruptChunkError, LayoutError, PoolExhaustedError
from nencache.layout import KVLayout
from nencache.pool import MemoryPool
from nencache.tiers.base import Tier
from nencache.tiers.factory import build_lower_tiers
from nencache.tiers.memory import MemoryTier, raw_page_bytes

log = logging.getLogger("nencache.pages")


def page_namespace(model_name: str, layout: KVLayout, page_tokens: int, *, shard: str = "", tenant: str = "") -> bytes:
    """The salt of page keys: a page of another model, page format, shard, geometry or tenant never matches.

    `shard` names what else makes the engine's pages differ (page format, pool, parallel ranks).
    """
    text = "\x00".join(["nencache-pages-v2", model_name, layout.describe(), str(page_tokens), shard, tenant])
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class PageStore:
    """Pages under SGLang's string keys, in a memory tier and the byte tiers below it.

    Writes go through to every tier (SGLang calls them from its own background thread); reads take
    the fastest tier that holds the page, check and decode it, and promote it into memory. A tier
    that fails counts as a miss for that call and is logged once.
    """

    def __init__(self, layout: KVLayout, page_tokens: int, namespace: bytes, *, memory: MemoryTier | None,
                 lower: Sequence[tuple[Tier, Codec]] = ()) -> None:
        self.layout = layout
        self.page_tokens = page_tokens
        self.namespace = namespace
        self.memory = memory
        self.lower = list(lower)
        self._warned: set[str] = set()
        self.counters = {"hits": 0, "misses": 0, "stored_pages": 0, "tier_errors": 0, "corrupt": 0}

    @classmethod
    def from_config(cls, config: CacheConfig, layout: KVLayout, page_tokens: int, namespace: bytes) -> "PageStore":
        memory = None
        if config.tiers.cpu.enabled:
            pool = MemoryPool(int(config.tiers.cpu.size), raw_page_bytes(layout, page_tokens), pin_memory=config.tiers.cpu.pin_memory)
            memory = MemoryTier(pool, layout, get_codec(config.tiers.cpu.codec))
        pairs = build_lower_tiers(config, namespace.hex())
        return cls(layout, page_tokens, namespace, memory=memory, lower=[(t, get_codec(c)) for t, c in pairs])

    def key(self, name: str) -> bytes:
        return hashlib.blake2b(self.namespace + name.encode(), digest_size=16).digest()

    def exists_prefix(self, names: Sequence[str]) -> int:
        """How many of `names`, from the first, some tier holds."""
        keys, found = [self.key(n) for n in names], 0
        while found < len(keys):
            advanced = self.memory.contains_prefix(keys[found:]) if self.memory is not None else 0
            for tier, _ in self.lower:
                if advanced:
                    break
                advanced = self._guard(tier, lambda t=tier: t.contains_prefix(keys[found:]), 0)
            if not advanced:
                break
            found += advanced
        return found

    def put(self, names: Sequence[str], chunks: Sequence[torch.Tensor]) -> list[bool]:
        """Store pages (chunks `[layers, 2, page_tokens, heads, dim]`); True where some tier took it."""
        done = [False] * len(names)
        keys = [self.key(n) for n in names]
        for index, (key, chunk) in enumerate(zip(keys, chunks)):
            self.layout.check(chunk, self.page_tokens)
            if self.memory is not None:
                try:
                    self.memory.put_tensor(key, chunk)
                    done[index] = True
                except PoolExhaustedError as exc:
                    self._warn("pool", f"page not kept in memory: {exc}")
        for tier, codec in self.lower:
            blobs = [(key, codec.encode(chunk.cpu(), key)) for key, chunk in zip(keys, chunks)]
            if self._guard(tier, lambda t=tier: t.put(blobs) or True, False):
                done = [True] * len(names)
        self.counters["stored_pages"] += sum(done)
        return done

    def get_into(self, names: Sequence[str], outs: Sequence[torch.Tensor]) -> list[bool]:
        """Copy pages into `outs` (chunk-shaped views of any strides); False where no tier had it."""
        keys = [self.key(n) for n in names]
        got = [self.memory is not None and self.memory.read_into(k, o) for k, o in zip(keys, outs)]
        for tier, codec in self.lower:
            wanted = [i for i, ok in enumerate(got) if not ok]
            if not wanted:
                break
            blobs = self._guard(tier, lambda t=tier: t.get([keys[i] for i in wanted]), None) or []
            for i, blob in zip(wanted, blobs):
                chunk = None if blob is None else self._decode(tier, codec, keys[i], blob)
                if chunk is None:
                    continue
                copy_into(outs[i], chunk)
                got[i] = True
                if self.memory is not None:
                    try:
                        self.memory.put_tensor(keys[i], chunk)
                    except PoolExhaustedError:
                        pass  # served, just not promoted
        self.counters["hits"] += sum(got)
        self.counters["misses"] += len(got) - sum(got)
        return got

    def clear(self) -> None:
        if self.memory is not None:
            self.memory.clear()
        for tier, _ in self.lower:
            self._guard(tier, tier.clear, None)

    def stats(self) -> dict[str, Any]:
        tiers = {t.name: t.stats().as_dict() for t, _ in self.lower}
        if self.memory is not None:
            tiers["memory"] = self.memory.stats().as_dict()
        return dict(self.counters, tiers=tiers)

    def close(self) -> None:
        for tier, _ in self.lower:
            self._guard(tier, tier.close, None)
        if self.memory is not None:
            self.memory.close()

    def _decode(self, tier: Tier, codec: Codec, key: bytes, blob: Any) -> torch.Tensor | None:
        try:
            chunk = codec.decode(blob, expected_key=key)
            self.layout.check(chunk, self.page_tokens)
            return chunk
        except (CorruptChunkError, LayoutError) as exc:
            self.counters["corrupt"] += 1
            self._warn(f"corrupt:{tier.name}", f"{tier.name}: dropped a corrupt page ({exc})")
            self._guard(tier, lambda: tier.delete([key]), None)
            return None

    def _guard(self, tier: Tier, call: Any, default: Any) -> Any:
        try:
            return call()
        except Exception as exc:
            self.counters["tier_errors"] += 1
            self._warn(f"tier:{tier.name}", f"tier {tier.name} failed ({exc!r}); treating it as a miss")
            return default

    def _warn(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            log.warning(message)
