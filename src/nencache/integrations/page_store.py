"""`PageStore`: KV pages under engine-chosen string keys, in NenCache's tiers.

Engines that name pages themselves (SGLang's HiCache hashes each page with its prefix) cannot use
`KVCache`'s token-keyed API. A `PageStore` keeps such pages as ordinary chunks
`[layers, 2, page_tokens, kv_heads, head_dim]` in the one chunk store (a memory tier and the byte
tiers below it: disk, Redis, a NenCache server), under 16-byte keys derived from the page name and a
namespace.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import torch

from nencache.assemble import build_store
from nencache.config import CacheConfig
from nencache.copy import copy_into
from nencache.errors import PoolExhaustedError
from nencache.layout import KVLayout
from nencache.store import Store, Want
from nencache.tiers.base import Tier
from nencache.tiers.memory import MemoryTier


def page_namespace(model_name: str, layout: KVLayout, page_tokens: int, *, shard: str = "", tenant: str = "") -> bytes:
    """The salt of page keys: a page of another model, page format, shard, geometry or tenant never matches.

    `shard` names what else makes the engine's pages differ (page format, pool, parallel ranks).
    """
    text = "\x00".join(["nencache-pages-v2", model_name, layout.describe(), str(page_tokens), shard, tenant])
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class PageStore:
    """Pages under SGLang's string keys, in the one chunk store (`nencache.store`).

    Writes land in the memory tier and are written to the tiers below by the store's write-behind
    (SGLang calls them from its own background thread; they never wait on disk or network); reads take
    the fastest tier that holds the page, check and decode it, and promote it into memory. A tier that
    fails counts as a miss for that call and is logged once. Without `keep_pages` (`local_cpu` off),
    the memory tier only stages pages until they are written below.
    """

    def __init__(self, layout: KVLayout, page_tokens: int, namespace: bytes, store: Store, *,
                 keep_pages: bool = True) -> None:
        self.layout = layout
        self.page_tokens = page_tokens
        self.namespace = namespace
        self.store = store
        self._keep_pages = keep_pages
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "stored_pages": 0}

    @classmethod
    def from_config(cls, config: CacheConfig, layout: KVLayout, page_tokens: int, namespace: bytes, *,
                    lower: Sequence[tuple[Tier, str]] | None = None) -> "PageStore":
        """The tiers `config` asks for (`lower` given: those below memory instead). Pages are not shared
        with peers (`enable_p2p` is for `KVCache`)."""
        assembled = build_store(config.replace(enable_p2p=False), layout, namespace.hex(), page_tokens=page_tokens,
                                lower=lower)
        return cls(layout, page_tokens, namespace, assembled.store, keep_pages=config.tiers.cpu.enabled)

    @property
    def memory(self) -> MemoryTier | None:
        """The memory tier, where pages are kept (None when it only stages them for the tiers below)."""
        return self.store.memory if self._keep_pages else None

    @property
    def counters(self) -> dict[str, int]:
        """Pages served and missed by `get_into`, stored by `put`; calls that failed and corrupt pages dropped."""
        found = self.store.counters()
        with self._lock:
            return dict(self._counts, tier_errors=found["tier_errors"], corrupt=found["corrupt"])

    def key(self, name: str) -> bytes:
        return hashlib.blake2b(self.namespace + name.encode(), digest_size=16).digest()

    def exists_prefix(self, names: Sequence[str]) -> int:
        """How many of `names`, from the first, some tier holds."""
        return self.store.contains_prefix([self.key(n) for n in names])

    def put(self, names: Sequence[str], chunks: Sequence[torch.Tensor]) -> list[bool]:
        """Store pages (chunks `[layers, 2, page_tokens, heads, dim]`); True where the store took it (or
        already held it). Tiers below memory are written in the background (see `flush`)."""
        for chunk in chunks:
            self.layout.check(chunk, self.page_tokens)
        done = [False] * len(names)
        if not self._keep_pages and not self.store.lower:
            return done  # nowhere to keep them
        deadline = self.store.deadline()
        for index, (name, chunk) in enumerate(zip(names, chunks)):
            try:
                self.store.put(self.key(name), self.page_tokens, lambda target, c=chunk: copy_into(target, c), deadline)
                done[index] = True
            except PoolExhaustedError as exc:
                self.store.warn("pool", f"page not stored: {exc}")
        with self._lock:
            self._counts["stored_pages"] += sum(done)
        return done

    def get_into(self, names: Sequence[str], outs: Sequence[torch.Tensor]) -> list[bool]:
        """Copy pages into `outs` (chunk-shaped views of any strides); False where no tier had it."""
        got = self.store.read([Want(self.key(n), self.page_tokens, o) for n, o in zip(names, outs)])
        with self._lock:
            self._counts["hits"] += sum(got)
            self._counts["misses"] += len(got) - sum(got)
        return got

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every page put so far is written to the tiers below; False on timeout or a lost write."""
        return self.store.flush(timeout)

    def clear(self) -> None:
        self.store.clear()

    def stats(self) -> dict[str, Any]:
        """The counters, what the write-behind wrote, dropped and failed, and a snapshot of each tier."""
        return self.counters | self.store.write_stats() | {"tiers": self.store.tier_stats()}

    def close(self) -> None:
        self.store.close()
