"""The worker side of the vLLM connector, as plain Python (no vLLM import).

`ConnectorWorker` executes a `StepPlan` against the engine's paged KV (`PagedKV`) and a `KVCache`:

- a load reads the request's cached chunks into a staging tensor (`retrieve_prefix`) and scatters
  tokens `[engine_tokens, end_tokens)` into its blocks. Tokens that could not be loaded (a chunk
  evicted since the lookup, a tier that failed, a load stopped because the request was aborted)
  are reported as failed blocks, which the engine recomputes;
- a save gathers the prompt's KV out of the blocks and stores it. Its leading whole chunks still in
  NenCache are neither gathered nor stored again.

Loads run in the engine's step (synchronous) or on a background thread (`async_load`), where they
can be stopped between pieces of `piece_tokens` tokens.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from nencache.cache import KVCache
from nencache.errors import LayoutError
from nencache.integrations.paged import PagedKV, blocks_of, slot_mapping
from nencache.integrations.vllm_scheduler import RequestWork, StepPlan

log = logging.getLogger("nencache.vllm")

ProgressHook = Callable[[str, int], None]


@dataclass(slots=True)
class LoadResult:
    """How a load ended: tokens `[start, loaded)` are in the engine's blocks, `failed_blocks` are not."""

    req_id: str
    start: int
    loaded: int
    end: int
    failed_blocks: list[int] = field(default_factory=list)
    stopped: bool = False


class ConnectorWorker:
    """Loads and saves for one engine worker (one tensor-parallel rank)."""

    def __init__(self, cache: KVCache, paged: PagedKV, *, async_load: bool = False, piece_tokens: int | None = None,
                 on_piece: ProgressHook | None = None) -> None:
        if paged.layout != cache.layout:
            raise LayoutError(f"the engine's KV layout {paged.layout} differs from the cache's {cache.layout}")
        self.cache = cache
        self.paged = paged
        self.async_load = async_load
        self.piece_tokens = piece_tokens or cache.chunk_size
        self.on_piece = on_piece
        self._lock = threading.Lock()
        self._inflight: dict[str, tuple[Future[LoadResult], threading.Event]] = {}
        self._done: set[str] = set()
        self._failed: set[int] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nencache-load") if async_load else None
        self._warned: set[str] = set()

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
        """Store the prompts whose prefill completed in this step (after its forward pass)."""
        for work in plan.saves:
            try:
                self._save(work)
            except Exception as exc:  # a failed save is a future miss, never an engine failure
                self._warn("save", f"NenCache save of request {work.req_id} failed: {exc!r}")

    # --- vLLM: get_finished / get_block_ids_with_load_errors --------------------------------------------
    def stop(self, req_ids: Iterable[str]) -> None:
        """Stop the in-flight loads of these (finished or aborted) requests."""
        with self._lock:
            for req_id in req_ids:
                entry = self._inflight.get(req_id)
                if entry is not None:
                    entry[1].set()

    def finished(self, finished_req_ids: Iterable[str] = ()) -> tuple[set[str] | None, set[str] | None]:
        """(finished saves, finished async loads) since the last call; stops loads of finished requests."""
        self.stop(finished_req_ids)
        with self._lock:
            done, self._done = self._done, set()
        return None, done or None

    def load_errors(self) -> set[int]:
        """Block ids whose load failed since the last call (reported no later than the load's finish)."""
        with self._lock:
            failed, self._failed = self._failed, set()
        return failed

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

    # --- internals ------------------------------------------------------------------------------------
    def _load(self, work: RequestWork, stop: threading.Event) -> LoadResult:
        assert work.load is not None
        spec, block_size = work.load, self.paged.block_size
        start, end = spec.engine_tokens, spec.end_tokens
        loaded = start
        try:
            staging = self._staging(spec.hit_tokens)
            got = self.cache.retrieve_prefix(work.token_ids[: spec.hit_tokens], salt=work.salt, out=staging)
            available = min(got, end)
            while loaded < available:
                if stop.is_set():
                    break
                if self.on_piece is not None:
                    self.on_piece(work.req_id, loaded)
                    if stop.is_set():
                        break
                upto = min(available, (loaded // self.piece_tokens + 1) * self.piece_tokens)
                slots = slot_mapping(work.block_ids, block_size, loaded, upto, device=self.paged.device)
                self.paged.scatter(slots, staging[:, :, loaded:upto])
                loaded = upto
            if self.paged.device.type == "cuda":
                torch.cuda.current_stream(self.paged.device).synchronize()
        except Exception as exc:
            self._warn("load", f"NenCache load of request {work.req_id} failed: {exc!r}")
        failed = blocks_of(work.block_ids, block_size, loaded, end) if loaded < end else []
        return LoadResult(work.req_id, start, loaded, end, failed, stopped=stop.is_set())

    def _save(self, work: RequestWork) -> None:
        assert work.save is not None
        tokens, total = work.token_ids, len(work.token_ids)
        chunk = self.cache.chunk_size
        known = min(work.save.cached_tokens, total) // chunk * chunk
        if known:  # chunks evicted since the scheduler's lookup are stored again from the engine's blocks
            known = self.cache.lookup(tokens[:known], salt=work.salt, record=False) // chunk * chunk
        staging = self._staging(total - known)
        slots = slot_mapping(work.block_ids, self.paged.block_size, known, total, device=self.paged.device)
        self.paged.gather(slots, out=staging)
        self.cache.store(tokens, staging, salt=work.salt, kv_start=known)

    def _staging(self, num_tokens: int) -> torch.Tensor:
        layout = self.cache.layout
        pin = self.paged.device.type == "cuda"
        return torch.empty(layout.shape(num_tokens), dtype=layout.dtype, pin_memory=pin)

    def _finish(self, result: LoadResult) -> None:
        if result.failed_blocks:
            log.info("request %s: loaded %d of %d tokens; %d blocks will be recomputed", result.req_id,
                     result.loaded - result.start, result.end - result.start, len(result.failed_blocks))
        with self._lock:
            self._failed.update(result.failed_blocks)

    def _collect(self, req_id: str, future: Future[LoadResult]) -> None:
        result = future.result()  # _load never raises
        self._finish(result)
        with self._lock:
            self._inflight.pop(req_id, None)
            self._done.add(req_id)

    def _warn(self, topic: str, message: str) -> None:
        with self._lock:
            first = topic not in self._warned
            self._warned.add(topic)
        (log.warning if first else log.debug)(message)
