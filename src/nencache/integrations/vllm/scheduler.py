"""The scheduler side of the vLLM connector, as plain Python (no vLLM import).

`ConnectorScheduler` keeps one `RequestState` per request. Its lookup runs on a background thread
(the scheduler never waits on a disk, Redis or peer): the workers pin the prefix they hold, and
until the answer is in, `match` says "not yet" (vLLM asks again next step). A request seen when it
is queued (`seen`) starts its lookup at once, which also brings its chunks up from lower tiers.

Each engine step, `build` turns what the engine scheduled into a `StepPlan` (the connector metadata
the workers execute): loads from the pinned chunks into the engine's blocks, saves of finished
prefills, final saves of finished requests (prompt and generated tokens, while vLLM keeps their
blocks), and the ids of requests whose in-flight loads must stop.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Protocol

from nencache.keys import TokenIds

log = logging.getLogger("nencache.vllm")


class PrefixPins(Protocol):
    """What the scheduler needs from the workers' caches (`lookup.RankLookups`)."""

    def pin(self, req_id: str, token_ids: TokenIds, *, salt: str | bytes | None = None) -> int: ...

    def release(self, req_ids: Iterable[str]) -> None: ...

    def reset(self) -> bool: ...


@dataclass(slots=True)
class LoadSpec:
    """Load tokens `[engine_tokens, end_tokens)` of a request; the workers pinned its first `hit_tokens`."""

    engine_tokens: int  # the engine's own prefix-cache hit: already in its blocks
    hit_tokens: int  # what NenCache pinned
    end_tokens: int  # where the engine's allocation for the load ends (<= hit_tokens)


@dataclass(slots=True)
class SaveSpec:
    """Store the request's tokens; the first `cached_tokens` are known to be in NenCache already.

    `final`: the request has finished and vLLM keeps its blocks until the workers report the save.
    """

    cached_tokens: int
    final: bool = False


@dataclass(slots=True)
class RequestWork:
    """What the workers do for one request in one step (picklable: it crosses process boundaries)."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    salt: str | None = None
    load: LoadSpec | None = None
    save: SaveSpec | None = None


@dataclass(slots=True)
class StepPlan:
    """The connector metadata of one engine step."""

    requests: list[RequestWork] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)  # requests whose in-flight loads must stop

    @property
    def loads(self) -> list[RequestWork]:
        return [work for work in self.requests if work.load is not None]

    @property
    def saves(self) -> list[RequestWork]:
        return [work for work in self.requests if work.save is not None]


@dataclass(slots=True)
class ScheduledRequest:
    """One request the engine scheduled this step (from vLLM's `NewRequestData` / `CachedRequestData`)."""

    req_id: str
    num_computed_tokens: int  # before this step
    num_scheduled_tokens: int
    block_ids: list[int] | None = None  # new request: all its blocks; running: blocks added this step
    prompt_token_ids: list[int] | None = None
    resumed: bool = False  # `block_ids` replace the request's blocks (resumed after preemption)


class LoadPhase(enum.Enum):
    NONE = "none"
    MATCHED = "matched"  # NenCache holds a prefix; waiting for the engine to allocate blocks
    ALLOCATED = "allocated"  # blocks allocated; the load goes out with the next plan
    SENT = "sent"  # in a plan; the workers are (or were) loading
    DONE = "done"


@dataclass(slots=True)
class RequestState:
    """What the scheduler knows about one request."""

    req_id: str
    prompt: list[int]
    salt: str | None = None
    lookup: Future[int] | None = None
    pinned: bool = False  # the workers hold a pin for this request
    engine_tokens: int = 0
    hit_tokens: int | None = None  # what the last lookup pinned (None: no answer yet)
    load_end: int = 0
    load: LoadPhase = LoadPhase.NONE
    block_ids: list[int] = field(default_factory=list)
    computed: int = 0
    prefill_done: bool = False  # the prompt's save was planned (or found unnecessary)
    saved_tokens: int = 0  # a prefix of this length was stored, or found stored, when the prefill completed
    finished: bool = False
    final_save: RequestWork | None = None


@dataclass(slots=True)
class SchedulerCounters:
    """Lookup figures since the last `take_counters` (for vLLM's connector stats)."""

    lookups: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0
    external_tokens: int = 0
    not_ready: int = 0


class ConnectorScheduler:
    """Matches prompts to cached chunks and plans the workers' loads and saves.

    `async_load` makes loads run between engine steps (the request waits for them); otherwise each
    load completes before the step's forward pass. `can_load` / `can_save` follow vLLM's `kv_role`;
    `save_decode` also stores the generated tokens of finished requests.
    """

    def __init__(self, pins: PrefixPins, *, block_size: int, chunk_size: int, save_unfull_chunk: bool = True,
                 async_load: bool = False, can_load: bool = True, can_save: bool = True, save_decode: bool = True,
                 lookup_wait: float = 0.02) -> None:
        if block_size <= 0 or chunk_size <= 0:
            raise ValueError(f"block_size and chunk_size must be positive, got {block_size} and {chunk_size}")
        self.pins = pins
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.save_unfull_chunk = save_unfull_chunk
        self.async_load = async_load
        self.can_load = can_load
        self.can_save = can_save
        self.save_decode = save_decode
        self.lookup_wait = lookup_wait
        self.states: dict[str, RequestState] = {}
        self.counters = SchedulerCounters()
        self.failed_blocks: set[int] = set()
        self._aborted: list[str] = []
        self._final: list[RequestWork] = []
        self._lock = threading.RLock()  # guards `states`; a done lookup calls back at once, lock held
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nencache-lookup")

    # --- vLLM: on_new_request ----------------------------------------------------------------------
    def seen(self, req_id: str, tokens: Sequence[int], *, salt: str | None = None) -> None:
        """A request was queued: start its lookup (and the promotion of its chunks) now."""
        if self.can_load and tokens:
            with self._lock:
                if req_id not in self.states:
                    self._start_lookup(RequestState(req_id, list(tokens), salt))

    # --- vLLM: get_num_new_matched_tokens ----------------------------------------------------------
    def match(self, req_id: str, tokens: Sequence[int] | None, num_computed_tokens: int, *,
              salt: str | None = None) -> tuple[int | None, bool]:
        """How many tokens past `num_computed_tokens` NenCache can load, and whether the load is async.

        None: the lookup is still running; the engine asks again later. The last token is never
        reported: the engine must compute at least one. Calling it again replaces the previous answer.
        """
        if not tokens:
            return 0, False
        limit = len(tokens) - 1
        with self._lock:
            state = self.states.get(req_id)
            if state is not None and state.load is LoadPhase.SENT:
                return 0, False  # its load is still running
            if not self.can_load:
                if state is None:
                    self.states[req_id] = RequestState(req_id, list(tokens), salt)
                return 0, False
            if state is None or len(state.prompt) != len(tokens) or state.salt != salt:
                if state is not None:  # resumed with its generated tokens: look the longer sequence up
                    self._drop_pin(state)
                state = self._start_lookup(RequestState(req_id, list(tokens), salt))
            elif state.lookup is None:  # its pin was handed back after an earlier answer
                if state.hit_tokens is not None and min(state.hit_tokens, limit) <= num_computed_tokens:
                    return 0, False  # the engine's own cache covers what NenCache holds
                self._start_lookup(state)
            future = state.lookup
        assert future is not None
        if not future.done():
            wait_futures([future], timeout=self.lookup_wait)
        if not future.done():
            self.counters.not_ready += 1
            return None, False
        hit = self._result(future, len(tokens))
        external = max(0, min(hit, limit) - num_computed_tokens)
        with self._lock:
            state.engine_tokens, state.hit_tokens = num_computed_tokens, hit
            state.load = LoadPhase.MATCHED if external else LoadPhase.NONE
            if not external:
                self._drop_pin(state)  # nothing to load: give the chunks back
        self.counters.lookups += 1
        self.counters.query_tokens += len(tokens)
        self.counters.hit_tokens += hit
        self.counters.external_tokens += external
        return external, bool(external) and self.async_load

    # --- vLLM: update_state_after_alloc -------------------------------------------------------------
    def allocated(self, req_id: str, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """The engine allocated `block_ids` (all of the request's blocks) for `num_external_tokens` to load."""
        with self._lock:
            state = self.states.get(req_id)
            if state is None or state.load in (LoadPhase.SENT, LoadPhase.DONE):
                return  # the second call of an async load, or a request NenCache had nothing for
            if num_external_tokens <= 0:
                state.load = LoadPhase.NONE
                self._drop_pin(state)
                return
            end = min(state.engine_tokens + num_external_tokens, state.hit_tokens or 0)
            if len(block_ids) < -(-end // self.block_size):
                log.warning("request %s: %d blocks cannot hold %d tokens; not loading", req_id, len(block_ids), end)
                state.load = LoadPhase.NONE
                self._drop_pin(state)
                return
            state.block_ids, state.load_end, state.load = list(block_ids), end, LoadPhase.ALLOCATED

    # --- vLLM: build_connector_meta -----------------------------------------------------------------
    def build(self, new: Iterable[ScheduledRequest] = (), running: Iterable[ScheduledRequest] = (),
              finished_req_ids: Iterable[str] = ()) -> StepPlan:
        """The plan of this step: pending loads, saves of prompts whose prefill completes now, final
        saves of finished requests, aborts."""
        with self._lock:
            for req_id in finished_req_ids:
                state = self.states.get(req_id)
                if state is not None and state.load is not LoadPhase.SENT and state.final_save is None:
                    self._drop_pin(state)
                    del self.states[req_id]
            for scheduled in new:
                self._advance(scheduled, fresh=True)
            for scheduled in running:
                self._advance(scheduled, fresh=False)
            plan = StepPlan(aborted=self._aborted)
            self._aborted = []
            for state in self.states.values():
                work = self._work(state)
                if work is not None:
                    plan.requests.append(work)
            plan.requests.extend(self._final)
            self._final = []
        return plan

    # --- vLLM: request_finished ---------------------------------------------------------------------
    def finished(self, req_id: str, tokens: Sequence[int] | None = None, num_computed_tokens: int = 0,
                 block_ids: Sequence[int] | None = None) -> bool:
        """The request finished or was aborted. True: vLLM must keep its blocks until the workers
        report it (an async load still running, or a final save of its generated tokens)."""
        with self._lock:
            state = self.states.get(req_id)
            if state is None:
                return False
            self._drop_pin(state)
            if state.load is LoadPhase.SENT and self.async_load:
                state.finished = True
                self._aborted.append(req_id)
                return True
            final = self._final_save(state, tokens, num_computed_tokens, block_ids)
            if final is not None:
                state.finished, state.final_save = True, final
                self._final.append(final)
                return True
            del self.states[req_id]
            return False

    # --- vLLM: update_connector_output --------------------------------------------------------------
    def worker_report(self, finished_loading: Iterable[str] = (), failed_blocks: Iterable[int] = (),
                      finished_saving: Iterable[str] = ()) -> None:
        """The workers finished these async loads (completed, failed or stopped) and final saves."""
        self.failed_blocks.update(failed_blocks)
        with self._lock:
            for req_id in finished_loading:
                state = self.states.get(req_id)
                if state is None:
                    continue
                if state.finished and state.final_save is None:
                    del self.states[req_id]
                else:
                    state.load = LoadPhase.DONE
            for req_id in finished_saving:
                self.states.pop(req_id, None)

    # --- vLLM: reset_cache ---------------------------------------------------------------------------
    def reset(self) -> bool:
        """Forget every lookup and clear the workers' caches (vLLM's reset of the prefix cache)."""
        with self._lock:
            for state in self.states.values():
                state.pinned, state.lookup = False, None
                if state.load is LoadPhase.MATCHED:
                    state.load = LoadPhase.NONE
        try:
            return self._pool.submit(self.pins.reset).result()
        except Exception as exc:
            log.warning("NenCache reset failed (%r)", exc)
            return False

    def take_counters(self) -> SchedulerCounters:
        counters, self.counters = self.counters, SchedulerCounters()
        return counters

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- internals ------------------------------------------------------------------------------------
    def _start_lookup(self, state: RequestState) -> RequestState:
        """Submit the state's pin lookup (the caller holds the lock) and register the state."""
        prompt, salt, req_id = state.prompt, state.salt, state.req_id
        future = self._pool.submit(self.pins.pin, req_id, prompt, salt=salt)
        state.lookup, state.pinned = future, True
        self.states[req_id] = state
        future.add_done_callback(lambda done, s=state: self._landed(s, done))
        return state

    def _landed(self, state: RequestState, future: Future[int]) -> None:
        """A lookup finished: if nobody wants its pin any more, hand it back."""
        if future.cancelled():
            return
        with self._lock:
            current = self.states.get(state.req_id)
            orphan = current is not state or state.lookup is not future or not state.pinned
        if orphan and future.exception() is None:
            self._release([state.req_id])

    def _result(self, future: Future[int], limit: int) -> int:
        try:
            return max(0, min(int(future.result()), limit))
        except Exception as exc:  # a lookup that fails is a miss: the engine computes the prompt
            log.warning("NenCache lookup failed (%r); treating it as a miss", exc)
            return 0

    def _drop_pin(self, state: RequestState) -> None:
        """Release the workers' pin of this request (the caller holds the lock)."""
        if state.pinned:
            state.pinned = False
            state.lookup = None
            self._release([state.req_id])

    def _release(self, req_ids: list[str]) -> None:
        try:
            self._pool.submit(self.pins.release, req_ids)
        except RuntimeError:  # shut down
            pass

    def _advance(self, scheduled: ScheduledRequest, *, fresh: bool) -> None:
        state = self.states.get(scheduled.req_id)
        if state is None:
            if not scheduled.prompt_token_ids:
                return
            state = RequestState(scheduled.req_id, list(scheduled.prompt_token_ids))
            self.states[scheduled.req_id] = state
        elif scheduled.prompt_token_ids and not state.prompt:
            state.prompt = list(scheduled.prompt_token_ids)
        if scheduled.block_ids is not None:
            if fresh or scheduled.resumed:
                state.block_ids = list(scheduled.block_ids)
            else:
                state.block_ids.extend(scheduled.block_ids)
        state.computed = scheduled.num_computed_tokens + scheduled.num_scheduled_tokens

    def _storable(self, length: int) -> int:
        return length if self.save_unfull_chunk else length // self.chunk_size * self.chunk_size

    def _work(self, state: RequestState) -> RequestWork | None:
        load = save = None
        hit = state.hit_tokens or 0
        if state.load is LoadPhase.ALLOCATED and not state.finished:
            load = LoadSpec(state.engine_tokens, hit, state.load_end)
            state.load = LoadPhase.SENT if self.async_load else LoadPhase.DONE
            state.pinned, state.lookup = False, None  # the workers take the pin with the load
        storable = self._storable(len(state.prompt))
        if self.can_save and not state.prefill_done and not state.finished and state.computed >= len(state.prompt):
            state.prefill_done = True
            if storable > hit and len(state.block_ids) * self.block_size >= storable:
                save = SaveSpec(hit)
                state.saved_tokens = storable
            else:
                state.saved_tokens = min(hit, storable)
        if load is None and save is None:
            return None
        tokens = state.prompt[: max(hit if load else 0, storable if save else 0)]
        return RequestWork(state.req_id, tokens, list(state.block_ids), state.salt, load, save)

    def _final_save(self, state: RequestState, tokens: Sequence[int] | None, computed: int,
                    block_ids: Sequence[int] | None) -> RequestWork | None:
        """The save of a finished request's prompt and generated tokens, if there is anything new."""
        if not (self.can_save and self.save_decode and tokens and block_ids):
            return None
        length = self._storable(min(computed, len(tokens)))
        known = state.saved_tokens
        if length <= known or len(block_ids) * self.block_size < length:
            return None
        cached = min(known, length) // self.chunk_size * self.chunk_size
        return RequestWork(state.req_id, list(tokens[:length]), list(block_ids), state.salt,
                           save=SaveSpec(cached, final=True))
