"""The vLLM-facing classes: `NenCacheConnectorV1` and its metadata. Imports vLLM.

Every method translates vLLM's objects into plain values and delegates: scheduler-side calls to
`ConnectorScheduler` (lookups through `RankLookups`), worker-side calls to `ConnectorWorker` over
`PagedKV`. When the model's KV cannot be served (`declared.served_group` says why, once, in the
log), every method is a no-op and the engine runs as if the connector were not there.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from nencache.cache import KVCache
from nencache.config_loader import load_config
from nencache.errors import NenCacheError
from nencache.integrations.vllm.declared import ServedGroup, paged_kv, served_group
from nencache.integrations.vllm.events import NenCacheKVEvents, cleared_event, stored_events
from nencache.integrations.vllm.lookup import LookupServer, PinBook, RankLookups, register_local
from nencache.integrations.vllm.metrics import NenCachePromMetrics, NenCacheStats
from nencache.integrations.vllm.scheduler import ConnectorScheduler, ScheduledRequest, StepPlan
from nencache.integrations.vllm.settings import connector_settings, model_identity, request_salt
from nencache.integrations.vllm.worker import ConnectorWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("nencache.vllm")


class NenCacheConnectorMetadata(KVConnectorMetadata):
    """One step's `StepPlan`, from the scheduler to the workers."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class NenCacheConnectorV1(KVConnectorBase_V1, SupportsHMA):
    """Prefix reuse across requests, restarts and machines through NenCache's tiers."""

    _cache_hit_source = CacheHitSource.HOST  # a load always comes out of the host memory pool

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        overrides, self._options = connector_settings(getattr(transfer, "kv_connector_extra_config", None))
        self._config = load_config(overrides=overrides).config
        parallel = vllm_config.parallel_config
        self._tp_size = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
        self._pp_size = int(getattr(parallel, "pipeline_parallel_size", 1) or 1)
        self._engine_key = f"{transfer.engine_id}/dp{getattr(parallel, 'data_parallel_rank', 0)}"
        self._group: ServedGroup | None
        self._group, why_not = served_group(kv_cache_config, vllm_config)
        if self._group is None:
            log.warning("NenCache connector disabled: %s. The engine runs without it.", why_not)
        self._scheduler: ConnectorScheduler | None = None
        self._pins: RankLookups | None = None
        self._worker: ConnectorWorker | None = None
        self._server: LookupServer | None = None
        self._rank = 0
        self._unserved: set[str] = set()  # final saves this worker could not do, reported done all the same
        self._events: NenCacheKVEvents | None = None
        self._pending_events: list[KVCacheEvent] = []
        events_config = getattr(vllm_config, "kv_events_config", None)
        self._record_events = bool(getattr(events_config, "enable_kv_cache_events", False))
        if role == KVConnectorRole.SCHEDULER and self._group is not None:
            self._pins = RankLookups(self._engine_key, self._tp_size * self._pp_size)
            self._scheduler = ConnectorScheduler(
                self._pins, block_size=self._group.block_size, chunk_size=self._config.chunk_size,
                save_unfull_chunk=self._config.save_unfull_chunk, async_load=self._options.async_load,
                can_load=transfer.kv_role != "kv_producer", can_save=transfer.kv_role != "kv_consumer",
                save_decode=self._options.save_decode, lookup_wait=self._options.lookup_wait_ms / 1000)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    # --- worker side --------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._group is None:
            return
        layers = self._vllm_config.compilation_config.static_forward_context
        try:
            paged = paged_kv(kv_caches, self._group, layers)
        except NenCacheError as exc:
            log.warning("NenCache connector disabled: %s. The engine runs without it.", exc)
            return
        tp_rank, pp_rank = _parallel_ranks()
        self._rank = pp_rank * self._tp_size + tp_rank
        model_id, fingerprint = model_identity(self._vllm_config)
        kind = "latent" if self._group.latent else "kv"
        extra = f"tp={tp_rank}/{self._tp_size};pp={pp_rank};layers={paged.layout.num_layers};{kind}"
        cache = KVCache(self._config, paged.layout, model_id, fingerprint=fingerprint, extra=extra)
        book = PinBook(cache, ttl=self._options.pin_seconds)
        event_namespace = _event_namespace(model_id, fingerprint, self._config) if self._record_events else None
        self._worker = ConnectorWorker(cache, paged, book, block_size=self._group.block_size,
                                       async_load=self._options.async_load,
                                       piece_tokens=self._options.piece_tokens or None, event_namespace=event_namespace)
        register_local(self._engine_key, self._rank, book)
        try:
            self._server = LookupServer(book, self._engine_key, self._rank)
        except OSError as exc:
            log.warning("NenCache lookup server could not start (%r); only in-process lookups will hit", exc)
        log.info("NenCache connector: %d layers, %s, kernel blocks of %d tokens, %s; chunk %d tokens",
                 paged.layout.num_layers, paged.layout.describe(), paged.block_tokens, paged.placement.describe(),
                 cache.chunk_size)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self._worker is not None and self.has_connector_metadata():
            self._worker.start_load(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # every layer is loaded in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return  # whole prompts are saved in wait_for_save

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        if self._worker is not None:
            self._worker.save(self._plan())
        else:  # this worker could not serve: still hand back the blocks vLLM keeps for final saves
            self._unserved.update(work.req_id for work in self._plan().saves if work.save and work.save.final)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            released, self._unserved = self._unserved, set()
            return released or None, None
        return self._worker.finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set() if self._worker is None else self._worker.load_errors()

    def get_kv_connector_stats(self) -> NenCacheStats | None:
        stats = NenCacheStats()
        if self._worker is not None:
            done = self._worker.take_counters()
            stats.add("loaded_tokens", done.loaded_tokens)
            stats.add("stored_tokens", done.stored_tokens)
            stats.add("failed_blocks", done.failed_blocks)
            stats.observe("load_seconds", done.load_seconds)
            stats.observe("save_seconds", done.save_seconds)
        if self._scheduler is not None:
            asked = self._scheduler.take_counters()
            stats.add("lookups", asked.lookups)
            stats.add("query_tokens", asked.query_tokens)
            stats.add("hit_tokens", asked.hit_tokens)
            stats.add("external_tokens", asked.external_tokens)
        return None if stats.is_empty() else stats

    def get_kv_connector_kv_cache_events(self) -> NenCacheKVEvents | None:
        if self._worker is None or self._worker.event_namespace is None:
            return None
        events = stored_events(self._worker.take_events(), self._worker.cache.chunk_size)
        if not events:
            return None
        batch = NenCacheKVEvents(num_workers=1)
        batch.add_events(events)
        return batch

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._worker is not None:
            register_local(self._engine_key, self._rank, None)
            self._worker.close()
            self._worker.cache.close()
        if self._scheduler is not None:
            self._scheduler.close()
        if self._pins is not None:
            self._pins.close()

    # --- scheduler side ---------------------------------------------------------------------------------
    def on_new_request(self, request: "Request") -> None:
        if self._scheduler is not None:
            self._scheduler.seen(request.request_id, list(request.all_token_ids), salt=request_salt(request))

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._scheduler is None:
            return 0, False
        return self._scheduler.match(request.request_id, list(request.all_token_ids), num_computed_tokens,
                                     salt=request_salt(request))

    def get_loaded_kv_cache_group_ids(self, request: "Request") -> tuple[int, ...]:
        return () if self._group is None else (self._group.index,)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        if self._scheduler is None or self._group is None:
            return
        self._scheduler.allocated(request.request_id, self._served(blocks.get_block_ids()) or [], num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        if self._scheduler is None:
            return NenCacheConnectorMetadata(StepPlan())
        scheduled = scheduler_output.num_scheduled_tokens
        new = [ScheduledRequest(r.req_id, r.num_computed_tokens, scheduled.get(r.req_id, 0), self._served(r.block_ids),
                                r.prompt_token_ids) for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
        running = [ScheduledRequest(req_id, cached.num_computed_tokens[i], scheduled.get(req_id, 0),
                                    self._served(cached.new_block_ids[i]), resumed=req_id in resumed)
                   for i, req_id in enumerate(cached.req_ids)]
        return NenCacheConnectorMetadata(self._scheduler.build(new, running, scheduler_output.finished_req_ids))

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        if self._scheduler is not None:
            self._scheduler.worker_report(connector_output.finished_recving or (),
                                          getattr(connector_output, "invalid_block_ids", None) or (),
                                          connector_output.finished_sending or ())
        batch = getattr(connector_output, "kv_cache_events", None)
        if batch is not None and batch.get_all_events():
            if self._events is None:
                self._events = NenCacheKVEvents(num_workers=batch.get_number_of_workers())
                self._events.add_events(batch.get_all_events())
            else:
                self._events.add_events(batch.get_all_events())
                self._events.increment_workers(batch.get_number_of_workers())

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._finished(request, block_ids), None

    def request_finished_all_groups(self, request: "Request",
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        return self._finished(request, self._served(block_ids)), None

    def take_events(self) -> "list[KVCacheEvent]":
        events, self._pending_events = self._pending_events, []
        if self._events is not None:
            events.extend(self._events.aggregate().get_all_events())
            self._events = None
        return events

    def reset_cache(self) -> bool | None:
        if self._scheduler is None:
            return None
        reset = self._scheduler.reset()
        if reset and self._record_events:
            self._pending_events.append(cleared_event())
        return reset

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> NenCacheStats:
        return NenCacheStats(data=data) if data is not None else NenCacheStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> NenCachePromMetrics:
        return NenCachePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # --- internals ----------------------------------------------------------------------------------------
    def _plan(self) -> StepPlan:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, NenCacheConnectorMetadata)
        return metadata.plan

    def _finished(self, request: "Request", block_ids: list[int] | None) -> bool:
        if self._scheduler is None:
            return False
        return self._scheduler.finished(request.request_id, list(request.all_token_ids), request.num_computed_tokens,
                                        block_ids)

    def _served(self, block_ids: Any) -> list[int] | None:
        """The served group's block ids, from vLLM's per-group tuple (or a flat list with one group)."""
        if block_ids is None or self._group is None:
            return None
        if block_ids and isinstance(block_ids[0], (list, tuple)):
            return list(block_ids[self._group.index])
        return list(block_ids)


def _event_namespace(model_id: str, fingerprint: str, config: Any) -> bytes:
    """The same on every rank: events name chunks by model and tokens, not by a rank's shard."""
    text = f"{model_id}|{fingerprint}|{config.chunk_size}|{config.tenant}"
    return hashlib.blake2b(text.encode(), digest_size=16, person=b"nencache-events").digest()


def _parallel_ranks() -> tuple[int, int]:
    """(tensor-parallel rank, pipeline rank) of this worker."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank(), get_pp_group().rank_in_group
    except Exception:  # not initialised (single process)
        return 0, 0
