"""The scheduler side of the vLLM connector, as plain Python (no vLLM import).

`ConnectorScheduler` keeps one `RequestState` per request: how much of its prompt NenCache holds,
which engine blocks receive it, whether its load was sent to the workers, and whether its prompt
was saved. Each engine step it turns what the engine scheduled into a `StepPlan` (the connector
metadata the workers execute): loads from NenCache into the engine's blocks, saves of finished
prefills into NenCache, and the ids of requests whose in-flight loads must stop.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nencache.keys import TokenIds

log = logging.getLogger("nencache.vllm")


class PrefixLookup(Protocol):
    """What the scheduler needs from the cache: `KVCache.lookup`, or a client of a worker's cache."""

    def lookup(self, token_ids: TokenIds, *, salt: str | bytes | None = None) -> int: ...


@dataclass(slots=True)
class LoadSpec:
    """Load tokens `[engine_tokens, end_tokens)` of a request; NenCache holds its first `hit_tokens`."""

    engine_tokens: int  # the engine's own prefix-cache hit: already in its blocks
    hit_tokens: int  # what NenCache can return (whole stored chunks)
    end_tokens: int  # where the engine's allocation for the load ends (<= hit_tokens)


@dataclass(slots=True)
class SaveSpec:
    """Store the request's tokens; the first `cached_tokens` are known to be in NenCache already."""

    cached_tokens: int


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
    engine_tokens: int = 0
    hit_tokens: int = 0
    load_end: int = 0
    load: LoadPhase = LoadPhase.NONE
    block_ids: list[int] = field(default_factory=list)
    computed: int = 0
    saved: bool = False
    finished: bool = False


class ConnectorScheduler:
    """Matches prompts to cached chunks and plans the workers' loads and saves.

    `async_load` makes loads run between engine steps (the request waits for them); otherwise each
    load completes before the step's forward pass. `can_load` / `can_save` follow vLLM's `kv_role`.
    """

    def __init__(self, lookup: PrefixLookup, *, block_size: int, chunk_size: int, save_unfull_chunk: bool = True,
                 async_load: bool = False, can_load: bool = True, can_save: bool = True) -> None:
        if block_size <= 0 or chunk_size <= 0:
            raise ValueError(f"block_size and chunk_size must be positive, got {block_size} and {chunk_size}")
        self.lookup_source = lookup
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.save_unfull_chunk = save_unfull_chunk
        self.async_load = async_load
        self.can_load = can_load
        self.can_save = can_save
        self.states: dict[str, RequestState] = {}
        self._aborted: list[str] = []
        self.failed_blocks: set[int] = set()

    # --- vLLM: get_num_new_matched_tokens ----------------------------------------------------------
    def match(self, req_id: str, prompt: Sequence[int] | None, num_computed_tokens: int, *,
              salt: str | None = None) -> tuple[int, bool]:
        """How many tokens past `num_computed_tokens` NenCache can load, and whether the load is async.

        The last prompt token is never reported: the engine must compute at least one token. Calling
        it again (the engine retries when it could not allocate) replaces the previous answer.
        """
        if not prompt:
            return 0, False
        previous = self.states.get(req_id)
        if previous is not None and previous.load is LoadPhase.SENT:
            return 0, False  # its load is still running
        state = RequestState(req_id, list(prompt), salt, saved=previous.saved if previous else False)
        self.states[req_id] = state
        if not self.can_load:
            return 0, False
        hit = self._lookup(state.prompt, salt)
        external = max(0, min(hit, len(state.prompt) - 1) - num_computed_tokens)
        state.engine_tokens, state.hit_tokens = num_computed_tokens, hit
        state.load = LoadPhase.MATCHED if external else LoadPhase.NONE
        return external, bool(external) and self.async_load

    # --- vLLM: update_state_after_alloc -------------------------------------------------------------
    def allocated(self, req_id: str, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """The engine allocated `block_ids` (all of the request's blocks) for `num_external_tokens` to load."""
        state = self.states.get(req_id)
        if state is None or state.load in (LoadPhase.SENT, LoadPhase.DONE):
            return  # the second call of an async load, or a request NenCache had nothing for
        if num_external_tokens <= 0:
            state.load = LoadPhase.NONE
            return
        end = min(state.engine_tokens + num_external_tokens, state.hit_tokens)
        needed = -(-end // self.block_size)
        if len(block_ids) < needed:
            log.warning("request %s: %d blocks cannot hold %d tokens; not loading", req_id, len(block_ids), end)
            state.load = LoadPhase.NONE
            return
        state.block_ids, state.load_end, state.load = list(block_ids), end, LoadPhase.ALLOCATED

    # --- vLLM: build_connector_meta -----------------------------------------------------------------
    def build(self, new: Iterable[ScheduledRequest] = (), running: Iterable[ScheduledRequest] = (),
              finished_req_ids: Iterable[str] = ()) -> StepPlan:
        """The plan of this step: pending loads, saves of prompts whose prefill completes now, aborts."""
        for req_id in finished_req_ids:
            state = self.states.get(req_id)
            if state is not None and state.load is not LoadPhase.SENT:
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
        return plan

    # --- vLLM: request_finished ---------------------------------------------------------------------
    def finished(self, req_id: str) -> bool:
        """The request finished or was aborted. True: keep its blocks until its load stops (vLLM frees
        them when the request shows up in `finished_recving`)."""
        state = self.states.get(req_id)
        if state is None:
            return False
        if state.load is LoadPhase.SENT and self.async_load:
            state.finished = True
            self._aborted.append(req_id)
            return True
        del self.states[req_id]
        return False

    # --- vLLM: update_connector_output --------------------------------------------------------------
    def worker_report(self, finished_loading: Iterable[str] = (), failed_blocks: Iterable[int] = ()) -> None:
        """The workers finished these async loads (completed, failed or stopped)."""
        self.failed_blocks.update(failed_blocks)
        for req_id in finished_loading:
            state = self.states.get(req_id)
            if state is None:
                continue
            if state.finished:
                del self.states[req_id]
            else:
                state.load = LoadPhase.DONE

    def stats(self) -> dict[str, Any]:
        phases = [state.load.value for state in self.states.values()]
        return {"requests": len(self.states), "loading": phases.count("sent"), "failed_blocks": len(self.failed_blocks)}

    # --- internals ------------------------------------------------------------------------------------
    def _lookup(self, prompt: list[int], salt: str | None) -> int:
        try:
            return max(0, min(int(self.lookup_source.lookup(prompt, salt=salt)), len(prompt)))
        except Exception as exc:  # a lookup that fails is a miss: the engine computes the prompt
            log.warning("NenCache lookup failed (%r); treating it as a miss", exc)
            return 0

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

    def _work(self, state: RequestState) -> RequestWork | None:
        load = save = None
        if state.load is LoadPhase.ALLOCATED and not state.finished:
            load = LoadSpec(state.engine_tokens, state.hit_tokens, state.load_end)
            state.load = LoadPhase.SENT if self.async_load else LoadPhase.DONE
        storable = len(state.prompt) if self.save_unfull_chunk else len(state.prompt) // self.chunk_size * self.chunk_size
        if (self.can_save and not state.saved and not state.finished and state.computed >= len(state.prompt)
                and storable > state.hit_tokens and len(state.block_ids) * self.block_size >= storable):
            save = SaveSpec(state.hit_tokens)
            state.saved = True
        if load is None and save is None:
            return None
        tokens = state.prompt[: max(state.hit_tokens if load else 0, storable if save else 0)]
        return RequestWork(state.req_id, tokens, list(state.block_ids), state.salt, load, save)
