"""`KVCache`: lookup / store / retrieve / prefetch / invalidate of KV under token prefixes.

A thin layer over the one chunk store (`nencache.store`): it turns token ids into chained chunk keys
(`nencache.keys`) and engine tensors into chunks, and leaves the tiers, the write-behind and the guard
to the store. `prompt()` hashes a prompt's tokens once; every call takes that handle in place of the
token ids, so an engine that looks a prompt up and then loads it hashes it once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nencache.assemble import build_store
from nencache.config import CacheConfig
from nencache.config_loader import load_config
from nencache.copy import copy_into
from nencache.errors import ChunkMissingError, ClosedError, LayoutError, PoolExhaustedError
from nencache.keys import ChunkSpan, TokenIds, chunk_spans, namespace_digest, partial_key, salted, token_array
from nencache.layout import KVLayout
from nencache.metrics import CallLatency
from nencache.pinned import PinnedChunk, PinnedPrefix
from nencache.policy.live import CachePolicies
from nencache.stats import CacheCounters
from nencache.store import Store, Want
from nencache.tiers.base import ReportsLookups, Tier
from nencache.tiers.disk.io import disk_path
from nencache.tiers.memory import Fill, MemoryTier
from nencache.writer import LowerTier


@dataclass(slots=True, eq=False)
class Prompt:
    """A prompt's tokens, hashed once into chunk keys (`KVCache.prompt`); accepted wherever token ids are.

    `spans` covers every chunk, the trailing partial one included; `full` of them are whole chunks.
    """

    tokens: np.ndarray
    namespace: bytes  # salted: the key chain starts here
    root: bytes  # the cache's own namespace: a prompt of another cache is refused
    spans: list[ChunkSpan]
    full: int
    chunk_size: int

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, num_tokens: int) -> "Prompt":
        """The first `num_tokens` tokens as a prompt of their own: its whole chunks are this prompt's (no
        hashing); only a new trailing partial chunk is hashed (fewer than `chunk_size` tokens)."""
        if num_tokens >= len(self.tokens):
            return self
        num_tokens = max(0, num_tokens)
        full = num_tokens // self.chunk_size
        spans = self.spans[:full]
        end = full * self.chunk_size
        if end < num_tokens:
            parent = spans[-1].key if spans else self.namespace
            spans.append(ChunkSpan(partial_key(parent, self.tokens[end:num_tokens]), end, num_tokens))
        return Prompt(self.tokens[:num_tokens], self.namespace, self.root, spans, full, self.chunk_size)


class KVCache:
    """A multi-tier cache of attention KV, keyed by token prefixes, for one model (one namespace)."""

    def __init__(
        self,
        config: CacheConfig | None = None,
        layout: KVLayout | None = None,
        model_id: str = "",
        *,
        fingerprint: str = "",
        extra: str = "",
        lower_tiers: Sequence[tuple[Tier, str]] | None = None,
    ) -> None:
        if layout is None:
            raise LayoutError("KVCache needs a KVLayout (layers, KV heads, head dim, dtype) of the model it caches")
        self.config = config if config is not None else load_config().config
        self.layout = layout
        self.model_id = model_id
        self.chunk_size = self.config.chunk_size
        self.namespace = namespace_digest(model_id, layout, self.chunk_size, fingerprint=fingerprint, extra=extra,
                                          tenant=self.config.tenant)
        self._token_bytes = layout.bytes_per_token
        self.policies = CachePolicies(self.config.eviction, self.config.prefetch, self.chunk_size)
        assembled = build_store(self.config, layout, self.namespace.hex(), eviction=self.policies.tier_policy,
                                lower=lower_tiers)
        self._store: Store = assembled.store
        self.peer: Tier | None = assembled.peer  # the peer tier with enable_p2p (docs/p2p.md)
        self.memory: MemoryTier = self._store.memory
        self._prefault = self._store.prefault  # benchmarks join it: the pool is mapped before requests come
        # the reuse model learned before a restart lives beside the disk tier's chunks
        self._policy_dir = disk_path(self.config.tiers.disk.path) / self.namespace.hex() if self.config.tiers.disk.path else None
        self.policies.load(self._policy_dir)
        self._counters = CacheCounters()
        self._skipped_at_flush = 0
        self._partials: dict[bytes, set[int]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.latency = CallLatency()  # load and save latency histograms (nencache.metrics)
        self._metrics: Any = None
        if self.config.metrics.port is not None:  # Prometheus metrics on their own port (docs/monitoring.md)
            from nencache.metrics import serve_metrics

            try:
                self._metrics = serve_metrics(self, self.config.metrics.host, self.config.metrics.port)
            except BaseException:
                self.close()
                raise

    @property
    def lower(self) -> list[LowerTier]:
        """The tiers below memory, in the order they are asked."""
        return self._store.lower

    def prompt(self, token_ids: TokenIds, *, salt: str | bytes | None = None) -> Prompt:
        """`token_ids` hashed once into their chunk keys: pass the result to `lookup`, `retrieve`, `store`,
        `prefetch` or `pin_prefix` in place of the token ids, and no call hashes them again."""
        tokens = token_array(token_ids)
        namespace = salted(self.namespace, salt)
        spans = chunk_spans(tokens, self.chunk_size, namespace, include_partial=True)
        return Prompt(tokens, namespace, self.namespace, spans, len(tokens) // self.chunk_size, self.chunk_size)

    # --- public API --------------------------------------------------------------------------------
    def lookup(self, token_ids: TokenIds | Prompt, *, salt: str | bytes | None = None, record: bool = True) -> int:
        """Length, in tokens, of the longest prefix of `token_ids` whose KV is cached in any tier.

        `record=False` leaves the lookup statistics alone (a check made while saving, not a request's lookup).
        """
        self._check_open()
        prompt = self._prompt(token_ids, salt)
        if record and self.policies.observing:  # a request's chain (partial chunk included) is what they learn
            self.policies.observe_request(prompt.spans, self._promote_planned)
        spans, tokens = prompt.spans, len(prompt.tokens)
        keys = [span.key for span in spans[: prompt.full]]
        found = self._store.contains_prefix(keys)
        matched = found * self.chunk_size
        if matched < tokens:  # a stored partial chunk may extend the run
            matched += self._match_partial(keys[found - 1] if found else prompt.namespace, prompt.tokens[matched:],
                                           self._tail_key(prompt, found))
        if record:
            self._counters.count_lookup(tokens, matched, found, len(keys) - found)
        return matched

    def note_request(self, token_ids: TokenIds | Prompt, *, salt: str | bytes | None = None) -> None:
        """Tell the eviction and prefetch policies (`eviction`, `prefetch`) that a request for `token_ids`
        arrived. Once per request: `lookup(record=True)` does it itself; an engine that finds prefixes
        with `pin_prefix` calls this when the request is queued."""
        self._check_open()
        if self.policies.observing:
            self.policies.observe_request(self._prompt(token_ids, salt).spans, self._promote_planned)

    def store(self, token_ids: TokenIds | Prompt, kv: torch.Tensor, *, salt: str | bytes | None = None,
              kv_start: int = 0) -> int:
        """Cache the KV of `token_ids` (`kv`: `[layers, 2, len(token_ids) - kv_start, kv_heads, head_dim]`).

        Chunks already cached are skipped. `kv_start` (a multiple of `chunk_size`) says `kv` starts at that
        token: an engine that knows a prefix is cached passes only the KV after it, and the chunks of that
        prefix are left as they are. Returns how many chunks were newly stored. Lower tiers are written in
        the background (see `flush`).
        """
        self._check_open()
        prompt = self._prompt(token_ids, salt)
        tokens = len(prompt.tokens)
        if kv_start % self.chunk_size or not 0 <= kv_start <= tokens:
            raise LayoutError(f"kv_start={kv_start} must be a multiple of chunk_size ({self.chunk_size}) between 0 "
                              f"and the {tokens} tokens given")
        self.layout.check(kv, tokens - kv_start)
        return self._store_spans(prompt, lambda s, e: kv[:, :, s - kv_start : e - kv_start], first=kv_start)

    def store_layers(self, token_ids: TokenIds | Prompt, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                     salt: str | bytes | None = None) -> int:
        """Like `store`, from per-layer `(keys, values)` shaped `[kv_heads, tokens, head_dim]` (or with a
        leading batch dimension of 1), as engines such as transformers keep them. No full-size copy is made.
        """
        self._check_open()
        prompt = self._prompt(token_ids, salt)
        views = [(self._heads_first(k, len(prompt)), self._heads_first(v, len(prompt))) for k, v in layers]
        if len(views) != self.layout.num_layers:
            raise LayoutError(f"got KV for {len(views)} layers, the layout has {self.layout.num_layers}")

        def fill(target: torch.Tensor, start: int, end: int) -> None:
            for index, (k, v) in enumerate(views):
                copy_into(target[index, 0], k[:, start:end].transpose(0, 1))
                copy_into(target[index, 1], v[:, start:end].transpose(0, 1))

        return self._store_spans(prompt, lambda start, end: lambda target: fill(target, start, end))

    def retrieve(self, token_ids: TokenIds | Prompt, *, salt: str | bytes | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """The cached KV of exactly `token_ids`, as `[layers, 2, len(token_ids), kv_heads, head_dim]`.

        `out` (any strides, e.g. a permuted view of an engine's buffer) receives it without a new
        allocation. Raises `ChunkMissingError` if some of it is not cached: retrieve what `lookup` reported.
        """
        self._check_open()
        prompt = self._prompt(token_ids, salt)
        out = self._output(out, len(prompt))
        got = self._retrieve(prompt, out)
        if got < len(prompt):
            raise ChunkMissingError(
                f"only the first {got} of {len(prompt)} tokens are cached; call lookup() first and retrieve "
                "at most the prefix it reports"
            )
        return out

    def retrieve_prefix(self, token_ids: TokenIds | Prompt, *, salt: str | bytes | None = None,
                        out: torch.Tensor | None = None) -> int:
        """Copy the KV of the longest cached prefix of `token_ids` into `out`; return its length in tokens.

        Unlike `retrieve`, a chunk evicted since `lookup` is not an error: the caller recomputes from there.
        """
        self._check_open()
        prompt = self._prompt(token_ids, salt)
        return self._retrieve(prompt, self._output(out, len(prompt)))

    def prefetch(self, token_ids: TokenIds | Prompt, *, salt: str | bytes | None = None) -> Future[int]:
        """Start promoting the chunks of `token_ids` from lower tiers into memory; `retrieve` waits for them.

        Call it when a request is queued. The future resolves to the number of chunks promoted.
        """
        self._check_open()
        return self._store.prefetch(self._wants(self._prompt(token_ids, salt).spans))

    def pin_prefix(self, token_ids: TokenIds | Prompt, *, salt: str | bytes | None = None) -> PinnedPrefix:
        """Bring the longest cached prefix of `token_ids` into the pool and pin it there until released.

        Chunks held only by lower tiers are fetched, checked and promoted first (the call waits for
        them). What the returned `PinnedPrefix` covers stays readable, whatever evictions or tier
        failures follow, until its `release()`. Counted as a lookup.
        """
        self._check_open()
        prompt = self._prompt(token_ids, salt)
        spans, tokens = prompt.spans[: prompt.full], prompt.tokens
        pinned = PinnedPrefix(0)
        try:
            full = self._pin_spans(spans, pinned)
            matched = full * self.chunk_size
            if full == len(spans) and matched < len(tokens):  # a stored partial chunk may extend the run
                parent = spans[-1].key if spans else prompt.namespace
                known = self._tail_key(prompt, full)
                length = self._match_partial(parent, tokens[matched:], known)
                if length:
                    key = known if known is not None and matched + length == len(tokens) else \
                        partial_key(parent, tokens[matched : matched + length])
                    tail = ChunkSpan(key, matched, matched + length)
                    self._pin_spans([tail], pinned)
            pinned.tokens = pinned.chunks[-1].end if pinned.chunks else 0
        except BaseException:
            pinned.release()
            raise
        self._counters.count_lookup(len(tokens), pinned.tokens, full, len(spans) - full)
        return pinned

    def invalidate(self, token_ids: TokenIds | Prompt | None = None, *, salt: str | bytes | None = None) -> None:
        """Drop a prefix's chunks (`token_ids` given) or everything of this namespace, in every tier."""
        self._check_open()
        if token_ids is None:
            self._store.clear()
            with self._lock:
                self._partials.clear()
            return
        self._store.delete([span.key for span in self._prompt(token_ids, salt).spans])

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every stored chunk is written to the lower tiers and durable there.

        True only if that finished within `timeout` and every chunk given to `store` since the previous
        `flush` was stored and written down. False otherwise: `stats()` counts each chunk not stored
        (`store_skipped_chunks`), given up by the write-behind (`write_dropped`) or not taken by a lower
        tier (`write_failed_chunks`).
        """
        self._check_open()
        written = self._store.flush(timeout)
        skipped = self._counters.as_dict()["store_skipped_chunks"]
        with self._lock:
            stored = skipped == self._skipped_at_flush
            self._skipped_at_flush = skipped
        return written and stored

    def stats(self) -> dict[str, Any]:
        """Counters of the cache and of each tier (hits, misses, stored/evicted chunks and bytes, errors)."""
        data: dict[str, Any] = self._counters.as_dict()
        found = self._store.counters()
        data.update(lower_hits=found["lower_hits"], tier_errors=found["tier_errors"])
        tiers = self._store.tier_stats()
        memory = tiers["memory"]
        data.update(evicted_chunks=memory["evicted_chunks"], evicted_bytes=memory["evicted_bytes"],
                    pool_bytes=self.memory.pool.capacity_bytes, pool_used_bytes=memory["bytes_used"])
        data.update(self._store.write_stats())
        data["tiers"] = tiers
        if isinstance(self.peer, ReportsLookups):
            data["p2p"] = self.peer.lookup_stats()
        return data

    def close(self) -> None:
        """Flush pending writes, stop background work, release the pool. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._metrics is not None:
            self._metrics.close()
        self.policies.close()
        self._store.close()
        try:
            self.policies.save(self._policy_dir)
        except OSError as exc:
            self._store.warn("policy", f"the reuse model could not be saved ({exc}); it starts fresh next time")

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this KVCache is closed; create a new one")

    def _prompt(self, token_ids: TokenIds | Prompt, salt: str | bytes | None) -> Prompt:
        if not isinstance(token_ids, Prompt):
            return self.prompt(token_ids, salt=salt)
        if token_ids.root != self.namespace:
            raise LayoutError("this Prompt was made by another KVCache (another model, layout or chunk size); "
                              "make it with this cache's prompt()")
        if salt and salted(self.namespace, salt) != token_ids.namespace:
            raise LayoutError("a Prompt carries its salt: pass salt to prompt(), not with the Prompt")
        return token_ids

    def _retrieve(self, prompt: Prompt, out: torch.Tensor) -> int:
        """Copy the longest cached prefix of `prompt` into `out` (checked); its length in tokens."""
        started = time.perf_counter()
        spans = prompt.spans
        views = out.split(self.chunk_size, 2) if len(spans) > 1 else (out,)  # one call: a view per chunk
        got_all = self._store.read([Want(s.key, s.end - s.start, view) for s, view in zip(spans, views)])
        got = len(prompt) if all(got_all) else spans[got_all.index(False)].start
        self._counters.count_retrieve(got, got * self._token_bytes)
        self.latency.observe("load", started)
        return got

    @staticmethod
    def _wants(spans: Sequence[ChunkSpan]) -> list[Want]:
        return [Want(span.key, span.end - span.start) for span in spans]

    def _output(self, out: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
        if out is None:
            return torch.empty(self.layout.shape(num_tokens), dtype=self.layout.dtype)
        return self.layout.check(out, num_tokens)

    def _heads_first(self, tensor: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if tensor.dim() == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        expected = (self.layout.num_kv_heads, num_tokens, self.layout.head_dim)
        if tuple(tensor.shape) != expected or tensor.dtype != self.layout.dtype:
            raise LayoutError(f"layer KV is {tuple(tensor.shape)} {tensor.dtype}; expected {expected} {self.layout.dtype}")
        return tensor

    def _store_spans(self, prompt: Prompt, chunk: Callable[[int, int], Fill], first: int = 0) -> int:
        """Store the chunks of `prompt` from `first` on; `chunk(start, end)` gives each one's `Fill` (the
        chunk itself when the caller has it as one tensor: a codec then encodes it without a staging copy)."""
        started = time.perf_counter()
        spans = prompt.spans if self.config.save_unfull_chunk else prompt.spans[: prompt.full]
        new = 0
        deadline = self._store.deadline()  # one backpressure bound for the call
        for index, span in enumerate(spans):
            if span.end <= first:
                continue  # the caller vouches for this prefix
            try:
                stored = self._store.put(span.key, span.end - span.start, chunk(span.start, span.end), deadline)
            except PoolExhaustedError as exc:
                skipped = sum(1 for s in spans[index:] if s.end > first and s.key not in self.memory)
                self._counters.add(store_failures=1, store_skipped_chunks=skipped)
                self._store.warn("pool", f"store skipped {skipped} chunks: {exc}")
                break
            if span.end - span.start < self.chunk_size:
                self._remember_partial(spans[index - 1].key if index else prompt.namespace, span.end - span.start)
            if stored:
                new += 1
                self._counters.add(stored_chunks=1, stored_bytes=(span.end - span.start) * self._token_bytes)
        self.latency.observe("save", started)
        return new

    def _pin_spans(self, spans: list[ChunkSpan], pinned: PinnedPrefix) -> int:
        """Pin the leading run of `spans` (promoting what only lower tiers hold); how many were pinned."""
        leases = self._store.pin(self._wants(spans))
        for span, lease in zip(spans, leases):
            pinned.chunks.append(PinnedChunk(span.start, span.end, lease))
        return len(leases)

    @staticmethod
    def _tail_key(prompt: Prompt, found: int) -> bytes | None:
        """The key of the prompt's trailing partial chunk when the run reached it (already hashed), else None."""
        return prompt.spans[-1].key if found == prompt.full < len(prompt.spans) else None

    def _match_partial(self, parent: bytes, rest: np.ndarray, tail: bytes | None = None) -> int:
        """The longest stored partial chunk after `parent` that is a prefix of `rest` (0 if none). `tail`:
        the key of all of `rest` as a partial chunk, when the caller has it."""
        with self._lock:
            lengths = {n for n in self._partials.get(parent, ()) if n <= len(rest)}
        if len(rest) < self.chunk_size:
            lengths.add(len(rest))
        for length in sorted(lengths, reverse=True):
            key = tail if tail is not None and length == len(rest) else partial_key(parent, rest[:length])
            if self._store.holds(key):
                return length
        return 0

    def _remember_partial(self, parent: bytes, length: int) -> None:
        with self._lock:
            self._partials.setdefault(parent, set()).add(length)

    def _promote_planned(self, spans: list[ChunkSpan]) -> None:
        """A learned prefetch fell due: promote what memory lacks (on the planner's thread)."""
        if not self._closed:
            self._store.promote(self._wants(spans))
