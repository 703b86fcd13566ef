"""The worker side of the vLLM connector, as plain Python (no vLLM import).

`ConnectorWorker` executes a `StepPlan` against the engine's paged KV (`PagedKV`) and a `KVCache`:

- a load takes the request's pin from the `PinBook` (what the scheduler's lookup promised) and
  scatters tokens `[engine_tokens, end_tokens)` from the pinned chunks straight into the request's
  blocks. Without a pin (it expired) it reads whatever is still cached; tokens it cannot load are
  reported as failed blocks, which the engine recomputes or fails, as its `kv_load_failure_policy` says;
- a save gathers the tokens out of the blocks and stores them. Its leading whole chunks still in
  NenCache are neither gathered nor stored again. A final save (a finished request's generated
  tokens) is reported back, so vLLM frees the blocks it kept for it.

Loads run in the engine's step (synchronous) or on a background thread (`async_load`), where they
can be stopped between pieces of `piece_tokens` tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from nencache.cache import KVCache
from nencache.errors import LayoutError
from nencache.integrations.vllm.lookup import PinBook
from nencache.integrations.vllm.paged import PagedKV, blocks_of, slot_mapping
from nencache.integrations.vllm.scheduler import RequestWork, StepPlan
from nencache.keys import chunk_spans, salted
from nencache.net.warn import WarnOnce
from nencache.pinned import PinnedPrefix

log = logging.getLogger("nencache.vllm")

ProgressHook = Callable[[str, int], None]
_SAVE_PIECE_CHUNKS = 8  # a save gathers at most this many chunks at a time


@dataclass(slots=True)
class LoadResult:
    """How a load ended: tokens `[start, loaded)` are in the engine's blocks, `failed_blocks` are not."""

    req_id: str
    start: int
    loaded: int
    end: int
    failed_blocks: list[int] = field(default_factory=list)
    stopped: bool = False


@dataclass(frozen=True, slots=True)
class StoredRun:
    """Chunks one save added to NenCache: their keys, the key before them, and their tokens."""

    keys: list[bytes]
    parent: bytes | None
    token_ids: list[int]


@dataclass(slots=True)
class WorkerCounters:
    """What the worker did since the last `take_counters` (for vLLM's connector stats)."""

    loaded_tokens: int = 0
    stored_tokens: int = 0
    failed_blocks: int = 0
    load_seconds: list[float] = field(default_factory=list)
    save_seconds: list[float] = field(default_factory=list)


class ConnectorWorker:
    """Loads and saves for one engine worker (one tensor- or pipeline-parallel rank)."""

    def __init__(self, cache: KVCache, paged: PagedKV, book: PinBook, *, block_size: int, async_load: bool = False,
                 piece_tokens: int | None = None, on_piece: ProgressHook | None = None,
                 event_namespace: bytes | None = None) -> None:
        if paged.layout != cache.layout:
            raise LayoutError(f"the engine's KV layout {paged.layout} differs from the cache's {cache.layout}")
        if block_size % paged.block_tokens:
            raise LayoutError(f"block size {block_size} is not a multiple of the kernel block size {paged.block_tokens}")
        self.cache = cache
        self.paged = paged
        self.book = book
        self.block_size = block_size
        self.async_load = async_load
        self.piece_tokens = piece_tokens or cache.chunk_size
        self.on_piece = on_piece
        self.event_namespace = event_namespace  # set: record stored chunks, keyed in this rank-independent namespace
        self._lock = threading.Lock()
        self._inflight: dict[str, tuple[Future[LoadResult], threading.Event]] = {}
        self._done: set[str] = set()
        self._sent: set[str] = set()
        self._failed: set[int] = set()
        self._counters = WorkerCounters()
        self._events: list[StoredRun] = []
        self._staging: torch.Tensor | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nencache-load") if async_load else None
        self._warn = WarnOnce(log)

    # --- vLLM: start_load_kv ------------------------------------------------------------------------
    def start_load(self, plan: StepPlan) -> None:
        """Stop the loads of aborted requests, then run (or start) this step's loads."""
        self.stop(plan.aborted)
        for work in plan.loads:
            if self._pool is None:
                self._finish(self._load(work, threading.Event()))
                continue
            stop = threading.Event()
            future = self._pool.submit(self._load, work, stop)
            with self._lock:
                self._inflight[work.req_id] = (future, stop)
            future.add_done_callback(lambda f, req_id=work.req_id: self._collect(req_id, f))

    # --- vLLM: wait_for_save ------------------------------------------------------------------------
    def save(self, plan: StepPlan) -> None:
        """Store the prompts whose prefill completed in this step (after its forward pass) and the
        sequences of requests that finished."""
        for work in plan.saves:
            try:
                self._save(work)
            except Exception as exc:  # a failed save is a future miss, never an engine failure
                self._warn("save", f"NenCache save of request {work.req_id} failed: {exc!r}")
            if work.save is not None and work.save.final:
                with self._lock:
                    self._sent.add(work.req_id)

    # --- vLLM: get_finished / get_block_ids_with_load_errors --------------------------------------------
    def stop(self, req_ids: Iterable[str]) -> None:
        """Stop the in-flight loads of these (finished or aborted) requests."""
        with self._lock:
            for req_id in req_ids:
                entry = self._inflight.get(req_id)
                if entry is not None:
                    entry[1].set()

    def finished(self, finished_req_ids: Iterable[str] = ()) -> tuple[set[str] | None, set[str] | None]:
        """(finished final saves, finished async loads) since the last call; stops loads of finished requests."""
        self.stop(finished_req_ids)
        with self._lock:
            done, self._done = self._done, set()
            sent, self._sent = self._sent, set()
        return sent or None, done or None

    def load_errors(self) -> set[int]:
        """Block ids whose load failed since the last call (reported no later than the load's finish)."""
        with self._lock:
            failed, self._failed = self._failed, set()
        return failed

    def take_counters(self) -> WorkerCounters:
        with self._lock:
            counters, self._counters = self._counters, WorkerCounters()
        return counters

    def take_events(self) -> list[StoredRun]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def wait(self, timeout: float | None = None) -> None:
        """Wait for every in-flight load (for shutdown and tests)."""
        with self._lock:
            futures = [future for future, _ in self._inflight.values()]
        for future in futures:
            future.exception(timeout)

    def close(self) -> None:
        with self._lock:
            for _, stop in self._inflight.values():
                stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.book.clear()

    # --- internals ------------------------------------------------------------------------------------
    def _load(self, work: RequestWork, stop: threading.Event) -> LoadResult:
        assert work.load is not None
        spec = work.load
        start, end = spec.engine_tokens, spec.end_tokens
        loaded = start
        started = time.perf_counter()
        pinned = self.book.take(work.req_id)
        try:
            if pinned is None or pinned.tokens < end:
                log.info("request %s: its lookup's pin is gone; loading what is still cached", work.req_id)
                if pinned is not None:
                    pinned.release()
                pinned = self.cache.pin_prefix(work.token_ids[: spec.hit_tokens], salt=work.salt)
            loaded = self._scatter(work, pinned, start, min(end, pinned.tokens), stop)
        except Exception as exc:
            self._warn("load", f"NenCache load of request {work.req_id} failed: {exc!r}")
        finally:
            if pinned is not None:
                pinned.release()
        failed = blocks_of(work.block_ids, self.block_size, loaded, end) if loaded < end else []
        with self._lock:
            self._counters.loaded_tokens += loaded - start
            self._counters.load_seconds.append(time.perf_counter() - started)
        return LoadResult(work.req_id, start, loaded, end, failed, stopped=stop.is_set())

    def _scatter(self, work: RequestWork, pinned: PinnedPrefix, start: int, end: int, stop: threading.Event) -> int:
        """Copy tokens `[start, end)` from the pinned chunks into the request's blocks, piece by piece."""
        loaded = start
        for chunk in pinned.chunks:
            while loaded < min(chunk.end, end):
                if stop.is_set():
                    return loaded
                if self.on_piece is not None:
                    self.on_piece(work.req_id, loaded)
                    if stop.is_set():
                        return loaded
                upto = min(chunk.end, end, (loaded // self.piece_tokens + 1) * self.piece_tokens)
                slots = slot_mapping(work.block_ids, self.block_size, loaded, upto, device=self.paged.device)
                self.paged.scatter(slots, chunk.tensor()[:, :, loaded - chunk.start : upto - chunk.start])
                loaded = upto
        if self.paged.device.type == "cuda":
            torch.cuda.current_stream(self.paged.device).synchronize()
        return loaded

    def _save(self, work: RequestWork) -> None:
        assert work.save is not None
        tokens, total = work.token_ids, len(work.token_ids)
        chunk = self.cache.chunk_size
        started = time.perf_counter()
        known = min(work.save.cached_tokens, total) // chunk * chunk
        prompt = self.cache.prompt(tokens, salt=work.salt)  # hashed once for the check and every piece
        if known:  # chunks evicted since the scheduler's lookup are stored again from the engine's blocks
            known = self.cache.lookup(prompt.head(known), record=False) // chunk * chunk
        stored = 0
        piece = _SAVE_PIECE_CHUNKS * chunk
        for begin in range(known, total, piece):  # a bounded staging buffer, whatever the prompt's length
            end = min(total, begin + piece)
            staging = self._staging_for(end - begin)
            slots = slot_mapping(work.block_ids, self.block_size, begin, end, device=self.paged.device)
            self.paged.gather(slots, out=staging)
            stored += self.cache.store(prompt.head(end), staging, kv_start=begin)
        with self._lock:
            self._counters.stored_tokens += total - known if stored else 0
            self._counters.save_seconds.append(time.perf_counter() - started)
        if stored and self.event_namespace is not None:
            spans = chunk_spans(tokens, chunk, salted(self.event_namespace, work.salt),
                                include_partial=self.cache.config.save_unfull_chunk)
            first = next((i for i, span in enumerate(spans) if span.start >= known), len(spans))
            run = StoredRun([span.key for span in spans[first:]], spans[first - 1].key if first else None,
                            list(tokens[known:]))
            with self._lock:
                self._events.append(run)

    def _staging_for(self, num_tokens: int) -> torch.Tensor:
        """A reused buffer for up to `_SAVE_PIECE_CHUNKS` chunks (a fresh one would fault in every page)."""
        layout = self.cache.layout
        if self._staging is None or self._staging.shape[2] < num_tokens:
            pin = self.paged.device.type == "cuda"
            self._staging = torch.empty(layout.shape(num_tokens), dtype=layout.dtype, pin_memory=pin)
        return self._staging[:, :, :num_tokens]

    def _finish(self, result: LoadResult) -> None:
        if result.failed_blocks:
            log.info("request %s: loaded %d of %d tokens; %d blocks will be recomputed", result.req_id,
                     result.loaded - result.start, result.end - result.start, len(result.failed_blocks))
        with self._lock:
            self._failed.update(result.failed_blocks)
            self._counters.failed_blocks += len(result.failed_blocks)

    def _collect(self, req_id: str, future: Future[LoadResult]) -> None:
        result = future.result()  # _load never raises
        self._finish(result)
        with self._lock:
            self._inflight.pop(req_id, None)
            self._done.add(req_id)
