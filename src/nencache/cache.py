"""`KVCache`: lookup / store / retrieve / prefetch / invalidate — the one orchestrator.

The memory tier (the static pool) answers first; byte tiers below it (disk, remote) are asked for
what memory lacks, their hits are checked, decoded and promoted into the pool. Stores land in the
pool and are written down by a background writer. Any failure below memory is counted, logged once
and treated as a miss: the engine recomputes, slower but never wrong.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from nencache.codecs import RawCodec, decode_any, get_codec
from nencache.config import CacheConfig
from nencache.config_loader import load_config
from nencache.copy import copy_into
from nencache.format import parse_header
from nencache.errors import ChunkMissingError, ClosedError, CorruptChunkError, LayoutError, PoolExhaustedError
from nencache.keys import ChunkSpan, TokenIds, chunk_spans, namespace_digest, partial_key, salted, token_array
from nencache.layout import KVLayout
from nencache.metrics import CallLatency
from nencache.pinned import PinnedChunk, PinnedPrefix
from nencache.policy.live import CachePolicies
from nencache.pool import MemoryPool
from nencache.stats import CacheCounters
from nencache.tiers.base import Tier
from nencache.tiers.factory import build_lower_tiers
from nencache.tiers.disk_io import disk_path
from nencache.tiers.memory import ChunkLease, MemoryTier, raw_page_bytes
from nencache.writer import Drop, LowerTier, TierSink, WriteBehind, WritePolicy

log = logging.getLogger("nencache")
_RAW = RawCodec()
_FETCH_BATCH_BYTES = 32 << 20  # chunks read from a lower tier per batch (their buffers are reused batch to batch)


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
        cpu_codec = get_codec(self.config.tiers.cpu.codec)
        page_bytes = (raw_page_bytes(layout, self.chunk_size) if isinstance(cpu_codec, RawCodec)
                      else cpu_codec.max_encoded_size(layout, self.chunk_size))
        if self.config.p2p.enabled and self.config.p2p.shared_memory:  # local peers map it read-only (docs/p2p.md)
            from nencache.p2p import peer_pool

            pool = peer_pool(int(self.config.tiers.cpu.size), page_bytes, pin_memory=self.config.tiers.cpu.pin_memory)
        else:
            pool = MemoryPool(int(self.config.tiers.cpu.size), page_bytes, pin_memory=self.config.tiers.cpu.pin_memory)
        self.policies = CachePolicies(self.config.eviction, self.config.prefetch, self.chunk_size)
        self.memory = MemoryTier(pool, layout, cpu_codec, policy=self.policies.tier_policy())
        # Map the pool's pages in the background: stores then never pay first-touch page faults.
        self._prefault = threading.Thread(target=pool.prefault, name="nencache-prefault", daemon=True)
        self._prefault.start()
        pairs = (lower_tiers if lower_tiers is not None
                 else build_lower_tiers(self.config, self.namespace.hex(), eviction=self.policies.tier_policy))
        # the reuse model learned before a restart lives beside the disk tier's chunks
        self._policy_dir = disk_path(self.config.tiers.disk.path) / self.namespace.hex() if self.config.tiers.disk.path else None
        self.policies.load(self._policy_dir)
        # --- P2P hook (docs/p2p.md): peers fetch from this memory tier; evictions unpublish ---------
        self.peer: Tier | None = None
        if self.config.p2p.enabled:
            from nencache.p2p import build_peer_tier, with_peer_tier

            peer = build_peer_tier(self.config, self.namespace.hex(), self.memory, layout)
            self.memory.on_evict = peer.evicted
            pairs, self.peer = with_peer_tier(pairs, peer), peer
        # --- end of the P2P hook --------------------------------------------------------------------
        self.lower = [LowerTier(tier, get_codec(codec), keys_only=tier is self.peer) for tier, codec in pairs]
        # Queued writes pin their pages: the pool is the queue. When every page holds a pending write,
        # the policy (backpressure for write_wait_seconds, then drop per write_drop) frees one.
        policy = WritePolicy(self.config.write.wait_seconds, Drop(self.config.write.drop),
                             self.config.write.queue_chunks)
        sink = TierSink(self.lower, self._tier_failed,
                        after_write=None if self.config.tiers.cpu.enabled else self._forget_staged)
        self._writer: WriteBehind[ChunkLease] | None = (WriteBehind(sink, policy, sync=sink.sync)
                                                        if self.lower else None)
        self._counters = CacheCounters()
        self._skipped_at_flush = 0
        self._partials: dict[bytes, set[int]] = {}
        self._inflight: dict[bytes, Future[Any]] = {}
        self._lock = threading.Lock()
        self._io: ThreadPoolExecutor | None = None
        self._decoders: ThreadPoolExecutor | None = None  # separate from _io: prefetch tasks wait on decodes
        self._fetcher: ThreadPoolExecutor | None = None  # reads the next batch of a fetch ahead
        self._warned: set[str] = set()
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

    # --- public API --------------------------------------------------------------------------------
    def lookup(self, token_ids: TokenIds, *, salt: str | bytes | None = None, record: bool = True) -> int:
        """Length, in tokens, of the longest prefix of `token_ids` whose KV is cached in any tier.

        `record=False` leaves the lookup statistics alone (a check made while saving, not a request's lookup).
        """
        self._check_open()
        tokens = token_array(token_ids)
        namespace = salted(self.namespace, salt)
        observe = record and self.policies.observing
        spans = chunk_spans(tokens, self.chunk_size, namespace, include_partial=observe)
        if observe:  # a request's lookup: its chain (partial chunk included) is what the policies learn from
            self.policies.observe_request(spans, self._promote_planned)
            spans = spans[: len(tokens) // self.chunk_size]
        keys = [span.key for span in spans]
        found = self._leading_run(keys)
        matched = found * self.chunk_size
        if matched < len(tokens):  # a stored partial chunk may extend the run
            matched += self._match_partial(keys[found - 1] if found else namespace, tokens[matched:])
        if record:
            self._counters.count_lookup(len(tokens), matched, found, len(keys) - found)
        return matched

    def note_request(self, token_ids: TokenIds, *, salt: str | bytes | None = None) -> None:
        """Tell the eviction and prefetch policies (`eviction`, `prefetch`) that a request for `token_ids`
        arrived. Once per request: `lookup(record=True)` does it itself; an engine that finds prefixes
        with `pin_prefix` calls this when the request is queued."""
        self._check_open()
        if self.policies.observing:
            spans = chunk_spans(token_array(token_ids), self.chunk_size, salted(self.namespace, salt))
            self.policies.observe_request(spans, self._promote_planned)

    def store(self, token_ids: TokenIds, kv: torch.Tensor, *, salt: str | bytes | None = None,
              kv_start: int = 0) -> int:
        """Cache the KV of `token_ids` (`kv`: `[layers, 2, len(token_ids) - kv_start, kv_heads, head_dim]`).

        Chunks already cached are skipped. `kv_start` (a multiple of `chunk_size`) says `kv` starts at that
        token: an engine that knows a prefix is cached passes only the KV after it, and the chunks of that
        prefix are left as they are. Returns how many chunks were newly stored. Lower tiers are written in
        the background (see `flush`).
        """
        self._check_open()
        tokens = token_array(token_ids)
        if kv_start % self.chunk_size or not 0 <= kv_start <= len(tokens):
            raise LayoutError(f"kv_start={kv_start} must be a multiple of chunk_size ({self.chunk_size}) between 0 "
                              f"and the {len(tokens)} tokens given")
        self.layout.check(kv, len(tokens) - kv_start)
        return self._store(tokens, salt, lambda target, s, e: copy_into(target, kv[:, :, s - kv_start : e - kv_start]),
                           first=kv_start)

    def store_layers(self, token_ids: TokenIds, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                     salt: str | bytes | None = None) -> int:
        """Like `store`, from per-layer `(keys, values)` shaped `[kv_heads, tokens, head_dim]` (or with a
        leading batch dimension of 1), as engines such as transformers keep them. No full-size copy is made.
        """
        self._check_open()
        tokens = token_array(token_ids)
        views = [(self._heads_first(k, len(tokens)), self._heads_first(v, len(tokens))) for k, v in layers]
        if len(views) != self.layout.num_layers:
            raise LayoutError(f"got KV for {len(views)} layers, the layout has {self.layout.num_layers}")

        def fill(target: torch.Tensor, start: int, end: int) -> None:
            for index, (k, v) in enumerate(views):
                copy_into(target[index, 0], k[:, start:end].transpose(0, 1))
                copy_into(target[index, 1], v[:, start:end].transpose(0, 1))

        return self._store(tokens, salt, fill)

    def retrieve(self, token_ids: TokenIds, *, salt: str | bytes | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """The cached KV of exactly `token_ids`, as `[layers, 2, len(token_ids), kv_heads, head_dim]`.

        `out` (any strides, e.g. a permuted view of an engine's buffer) receives it without a new
        allocation. Raises `ChunkMissingError` if some of it is not cached: retrieve what `lookup` reported.
        """
        self._check_open()
        tokens = token_array(token_ids)
        out = self._output(out, len(tokens))
        got = self.retrieve_prefix(tokens, salt=salt, out=out)
        if got < len(tokens):
            raise ChunkMissingError(
                f"only the first {got} of {len(tokens)} tokens are cached; call lookup() first and retrieve "
                "at most the prefix it reports"
            )
        return out

    def retrieve_prefix(self, token_ids: TokenIds, *, salt: str | bytes | None = None,
                        out: torch.Tensor | None = None) -> int:
        """Copy the KV of the longest cached prefix of `token_ids` into `out`; return its length in tokens.

        Unlike `retrieve`, a chunk evicted since `lookup` is not an error: the caller recomputes from there.
        """
        self._check_open()
        started = time.perf_counter()
        tokens = token_array(token_ids)
        out = self._output(out, len(tokens))
        spans = chunk_spans(tokens, self.chunk_size, salted(self.namespace, salt), include_partial=True)
        missing = [span for span in spans if not self.memory.read_into(span.key, out[:, :, span.start : span.end])]
        if missing:
            self._wait_inflight([span.key for span in missing])
            missing = [s for s in missing if not self.memory.read_into(s.key, out[:, :, s.start : s.end])]
        if missing:
            fetched = self._fetch_lower(missing, out)
            missing = [span for span in missing if span.key not in fetched]
        got = missing[0].start if missing else len(tokens)
        self._counters.add(retrieved_tokens=got, retrieved_bytes=self.layout.nbytes(got))
        self.latency.observe("load", started)
        return got

    def prefetch(self, token_ids: TokenIds, *, salt: str | bytes | None = None) -> Future[int]:
        """Start promoting the chunks of `token_ids` from lower tiers into memory; `retrieve` waits for them.

        Call it when a request is queued. The future resolves to the number of chunks promoted.
        """
        self._check_open()
        tokens = token_array(token_ids)
        spans = chunk_spans(tokens, self.chunk_size, salted(self.namespace, salt), include_partial=True)
        todo = [span for span in spans if span.key not in self.memory]
        done: Future[int] = Future()
        if not todo or not self.lower:
            done.set_result(0)
            return done
        future = self._executor().submit(self._promote, todo)
        with self._lock:
            for span in todo:
                self._inflight.setdefault(span.key, future)
        future.add_done_callback(lambda _: self._clear_inflight(todo, future))
        return future

    def pin_prefix(self, token_ids: TokenIds, *, salt: str | bytes | None = None) -> PinnedPrefix:
        """Bring the longest cached prefix of `token_ids` into the pool and pin it there until released.

        Chunks held only by lower tiers are fetched, checked and promoted first (the call waits for
        them). What the returned `PinnedPrefix` covers stays readable, whatever evictions or tier
        failures follow, until its `release()`. Counted as a lookup.
        """
        self._check_open()
        tokens = token_array(token_ids)
        namespace = salted(self.namespace, salt)
        spans = chunk_spans(tokens, self.chunk_size, namespace, include_partial=False)
        pinned = PinnedPrefix(0)
        try:
            full = self._pin_spans(spans, pinned)
            matched = full * self.chunk_size
            if full == len(spans) and matched < len(tokens):  # a stored partial chunk may extend the run
                parent = spans[-1].key if spans else namespace
                length = self._match_partial(parent, tokens[matched:])
                if length:
                    tail = ChunkSpan(partial_key(parent, tokens[matched : matched + length]), matched, matched + length)
                    self._pin_spans([tail], pinned)
            pinned.tokens = pinned.chunks[-1].end if pinned.chunks else 0
        except BaseException:
            pinned.release()
            raise
        self._counters.count_lookup(len(tokens), pinned.tokens, full, len(spans) - full)
        return pinned

    def _pin_spans(self, spans: list[ChunkSpan], pinned: PinnedPrefix) -> int:
        """Pin the leading run of `spans` (promoting what only lower tiers hold); how many were pinned."""
        missing = [span for span in spans if span.key not in self.memory]
        if missing:
            self._wait_inflight([span.key for span in missing])
            missing = [span for span in missing if span.key not in self.memory]
            if missing:
                self._fetch_lower(missing, None)
        count = 0
        for span in spans:
            lease = self.memory.lease(span.key)
            if lease is None:  # not held anywhere, or evicted again before it could be pinned
                break
            pinned.chunks.append(PinnedChunk(span.start, span.end, lease))
            count += 1
        return count

    def invalidate(self, token_ids: TokenIds | None = None, *, salt: str | bytes | None = None) -> None:
        """Drop a prefix's chunks (`token_ids` given) or everything of this namespace, in every tier."""
        self._check_open()
        if self._writer is not None:
            self._writer.drain()  # a queued write must not bring an invalidated chunk back
        if token_ids is None:
            self.memory.clear()
            with self._lock:
                self._partials.clear()
            for lower in self.lower:
                self._guard(lower.tier, lower.tier.clear, None)
            return
        keys = [s.key for s in chunk_spans(token_ids, self.chunk_size, salted(self.namespace, salt))]
        self.memory.delete(keys)
        for lower in self.lower:
            self._guard(lower.tier, lambda t=lower.tier: t.delete(keys), None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every stored chunk is written to the lower tiers and durable there.

        True only if that finished within `timeout` and every chunk given to `store` since the previous
        `flush` was stored and written down. False otherwise: `stats()` counts each chunk not stored
        (`store_skipped_chunks`), given up by the write-behind (`write_dropped`) or not taken by a lower
        tier (`write_failed_chunks`).
        """
        self._check_open()
        written = True if self._writer is None else self._writer.flush(timeout)
        skipped = self._counters.as_dict()["store_skipped_chunks"]
        with self._lock:
            stored = skipped == self._skipped_at_flush
            self._skipped_at_flush = skipped
        return written and stored

    def stats(self) -> dict[str, Any]:
        """Counters of the cache and of each tier (hits, misses, stored/evicted chunks and bytes, errors)."""
        data: dict[str, Any] = self._counters.as_dict()
        memory = self.memory.stats()
        data.update(evicted_chunks=memory.evicted_chunks, evicted_bytes=memory.evicted_bytes,
                    pool_bytes=self.memory.pool.capacity_bytes, pool_used_bytes=memory.bytes_used)
        if self._writer is not None:
            counts = self._writer.counts()
            data.update(write_pending=counts.pending, written_chunks=counts.written, write_dropped=counts.dropped,
                        write_failed_chunks=counts.failed)
        data["tiers"] = {"memory": memory.as_dict()} | {l.tier.name: l.tier.stats().as_dict() for l in self.lower}
        return data

    def close(self) -> None:
        """Flush pending writes, stop background work, release the pool. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._metrics is not None:
            self._metrics.close()
        self.policies.close()
        if self._writer is not None:
            self._writer.close()
        if self._io is not None:
            self._io.shutdown(wait=True)
        for pool in (self._decoders, self._fetcher):
            if pool is not None:
                pool.shutdown(wait=True)
        self._prefault.join()
        self.memory.close()
        try:
            self.policies.save(self._policy_dir)
        except OSError as exc:
            self._warn_once("policy", f"the reuse model could not be saved ({exc}); it starts fresh next time")
        for lower in self.lower:
            self._guard(lower.tier, lower.tier.close, None)

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this KVCache is closed; create a new one")

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

    def _store(self, tokens: np.ndarray, salt: str | bytes | None,
               fill: Callable[[torch.Tensor, int, int], object], first: int = 0) -> int:
        started = time.perf_counter()
        namespace = salted(self.namespace, salt)
        spans = chunk_spans(tokens, self.chunk_size, namespace, include_partial=self.config.save_unfull_chunk)
        new = 0
        writer = self._writer
        deadline = writer.deadline() if writer is not None else 0.0  # one backpressure bound for the call
        for index, span in enumerate(spans):
            if span.end <= first:
                continue  # the caller vouches for this prefix
            try:
                lease = self._put_chunk(span, fill, deadline)
            except PoolExhaustedError as exc:
                skipped = sum(1 for s in spans[index:] if s.end > first and s.key not in self.memory)
                self._counters.add(store_failures=1, store_skipped_chunks=skipped)
                self._warn_once("pool", f"store skipped {skipped} chunks: {exc}")
                break
            if span.num_tokens < self.chunk_size:
                self._remember_partial(spans[index - 1].key if index else namespace, span.num_tokens)
            if lease is not None:
                new += 1
                self._counters.add(stored_chunks=1, stored_bytes=self.layout.nbytes(span.num_tokens))
                if writer is not None:
                    writer.submit(lease, deadline)
                else:
                    lease.release()
        self.latency.observe("save", started)
        return new

    def _put_chunk(self, span: ChunkSpan, fill: Callable[[torch.Tensor, int, int], object],
                   deadline: float) -> ChunkLease | None:
        """Copy one chunk into the pool, pinned for the writer (None: it was already held).

        A pool whose every page is pinned (pending writes, readers) gets room from the write-behind's
        policy: backpressure until `deadline`, then a dropped write. `PoolExhaustedError` when the policy
        gives up the new chunk or nothing can be freed.
        """
        while True:
            progress = self._writer.progress if self._writer is not None else 0
            try:
                return self.memory.store_filled(span.key, span.num_tokens,
                                                lambda target: fill(target, span.start, span.end))
            except PoolExhaustedError:
                if self._writer is None or not self._writer.make_room(deadline, progress):
                    raise

    def _leading_run(self, keys: list[bytes]) -> int:
        """How many leading keys some tier holds, asking memory first, then each lower tier in order."""
        found = 0
        while found < len(keys):
            found += self.memory.contains_prefix(keys[found:])
            if found == len(keys):
                break
            for lower in self.lower:
                advanced = self._guard(lower.tier, lambda t=lower.tier: t.contains_prefix(keys[found:]), 0)
                if advanced:
                    found += advanced
                    break
            else:
                break
        return found

    def _match_partial(self, parent: bytes, rest: np.ndarray) -> int:
        """The longest stored partial chunk after `parent` that is a prefix of `rest` (0 if none)."""
        with self._lock:
            lengths = {n for n in self._partials.get(parent, ()) if n <= len(rest)}
        if len(rest) < self.chunk_size:
            lengths.add(len(rest))
        for length in sorted(lengths, reverse=True):
            key = partial_key(parent, rest[:length])
            if key in self.memory or any(
                self._guard(l.tier, lambda t=l.tier: t.contains_prefix([key]), 0) for l in self.lower
            ):
                return length
        return 0

    def _remember_partial(self, parent: bytes, length: int) -> None:
        with self._lock:
            self._partials.setdefault(parent, set()).add(length)

    def _fetch_lower(self, spans: list[ChunkSpan], out: torch.Tensor | None) -> set[bytes]:
        """Fetch `spans` from the lower tiers, check, decode, promote into memory and copy into `out`.

        In batches of about `_FETCH_BATCH_BYTES`, the first tier's read of the next batch running while
        this one is decoded: read buffers are reused instead of faulted in fresh, and reads overlap
        decoding. A chunk no tier has ends the prefix: nothing after it is fetched.
        """
        fetched: set[bytes] = set()
        if not self.lower or not spans:
            return fetched
        per_batch = max(1, _FETCH_BATCH_BYTES // max(1, self.layout.nbytes(self.chunk_size)))
        batches = [spans[i : i + per_batch] for i in range(0, len(spans), per_batch)]
        ahead = self._read_ahead(batches[0])
        for index, batch in enumerate(batches):
            for order, lower in enumerate(self.lower):
                wanted = [span for span in batch if span.key not in fetched]
                if not wanted:
                    break
                if order == 0:
                    blobs = ahead.result()
                    ahead = self._read_ahead(batches[index + 1]) if index + 1 < len(batches) else None
                else:
                    blobs = self._guard(lower.tier, lambda t=lower.tier, w=wanted: t.get([s.key for s in w]), None)
                hits = [(span, blob) for span, blob in zip(wanted, blobs or ()) if blob is not None]
                for (span, _), landed in zip(hits, self._each(lambda hit, t=lower: self._land(t, *hit, out), hits)):
                    if landed:
                        fetched.add(span.key)
                        self._counters.add(lower_hits=1)
            if any(span.key not in fetched for span in batch):
                break  # the prefix ends in this batch (a read ahead, if any, finishes unused)
        return fetched

    def _read_ahead(self, batch: list[ChunkSpan]) -> Future[Any]:
        """Start the first lower tier's read of `batch` on a fetch thread."""
        with self._lock:
            if self._fetcher is None:
                self._fetcher = ThreadPoolExecutor(max_workers=self.config.tiers.io_threads, thread_name_prefix="nencache-fetch")
        tier = self.lower[0].tier
        return self._fetcher.submit(self._guard, tier, lambda: tier.get([s.key for s in batch]), None)

    def _land(self, lower: LowerTier, span: ChunkSpan, blob: Any, out: torch.Tensor | None) -> bool:
        """Decode one fetched chunk, copy it into `out` and promote it; False if it was corrupt."""
        chunk = self._decode(lower, span, blob)
        if chunk is None:
            return False
        if out is not None:
            copy_into(out[:, :, span.start : span.end], chunk)
        if out is None or self.config.tiers.cpu.enabled:  # without local_cpu, only prefetches stage in the pool
            try:
                self.memory.put_tensor(span.key, chunk)
            except PoolExhaustedError:
                pass  # served, just not promoted
        return True

    def _each(self, fn: Callable[[Any], bool], items: list[Any]) -> list[bool]:
        """`fn` over `items`, on the decode threads when there are several (decoders and copies release the GIL)."""
        if len(items) < 2:
            return [fn(item) for item in items]
        with self._lock:
            if self._decoders is None:
                self._decoders = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                    thread_name_prefix="nencache-decode")
        return list(self._decoders.map(fn, items))

    def _decode(self, lower: LowerTier, span: ChunkSpan, blob: Any) -> torch.Tensor | None:
        try:
            header = parse_header(blob)
            if header.codec_id == RawCodec.codec_id and header.wrapper_id == 0:
                # Copied into the pool and `out` right away: no need for a private copy first.
                chunk = _RAW.view(blob, span.key, verify=not getattr(lower.tier, "checks_payload", False))
            elif header.codec_id == lower.codec.codec_id:
                chunk = lower.codec.decode(blob, expected_key=span.key)
            else:  # written by an instance with another codec: the header says which
                chunk = decode_any(blob, expected_key=span.key)
            if tuple(chunk.shape) != self.layout.shape(span.num_tokens) or chunk.dtype != self.layout.dtype:
                raise CorruptChunkError(f"chunk holds {tuple(chunk.shape)} {chunk.dtype}, not this layout")
            return chunk
        except CorruptChunkError as exc:
            stats = lower.tier.stats()
            with stats.lock:
                stats.corrupt += 1
            self._warn_once(f"corrupt:{lower.tier.name}", f"{lower.tier.name}: dropped a corrupt chunk ({exc})")
            self._guard(lower.tier, lambda: lower.tier.delete([span.key]), None)
            return None

    def _promote_planned(self, spans: list[ChunkSpan]) -> None:
        """A learned prefetch fell due: promote what memory lacks (on the planner's thread)."""
        if not self._closed:
            self._promote([span for span in spans if span.key not in self.memory])

    def _promote(self, spans: list[ChunkSpan]) -> int:
        return len(self._fetch_lower(spans, None))

    def _wait_inflight(self, keys: list[bytes]) -> None:
        with self._lock:
            futures = {id(f): f for k in keys if (f := self._inflight.get(k)) is not None}
        for future in futures.values():
            try:
                future.result()
            except Exception:  # a failed prefetch is just a miss
                pass

    def _clear_inflight(self, spans: list[ChunkSpan], future: Future[Any]) -> None:
        with self._lock:
            for span in spans:
                if self._inflight.get(span.key) is future:
                    del self._inflight[span.key]

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._io is None:
                self._io = ThreadPoolExecutor(max_workers=self.config.tiers.io_threads, thread_name_prefix="nencache-io")
            return self._io

    def _forget_staged(self, key: bytes) -> None:
        """With `local_cpu` off, the pool only stages chunks until they are written below."""
        self.memory.delete([key])

    def _guard(self, tier: Tier, call: Any, default: Any) -> Any:
        """Run a lower-tier call; any failure is counted, logged once per tier, and returns `default`."""
        try:
            return call()
        except Exception as exc:
            self._tier_failed(tier, exc)
            return default

    def _tier_failed(self, tier: Tier, exc: BaseException) -> None:
        stats = tier.stats()
        with stats.lock:
            stats.errors += 1
        self._counters.add(tier_errors=1)
        self._warn_once(f"tier:{tier.name}", f"tier {tier.name} failed ({exc!r}); treating it as a miss")

    def _warn_once(self, topic: str, message: str) -> None:
        with self._lock:
            if topic in self._warned:
                return
            self._warned.add(topic)
        log.warning(message)
