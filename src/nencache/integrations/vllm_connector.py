"""The vLLM-facing classes: `NenCacheConnectorV1` and its metadata. Imports vLLM; load it through
`nencache.integrations.vllm`, which explains what is missing when vLLM is not installed.

Every method translates vLLM's objects into plain values and delegates: scheduler-side calls to
`ConnectorScheduler`, worker-side calls to `ConnectorWorker` over `PagedKV`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from nencache.cache import KVCache
from nencache.config import load_config
from nencache.integrations.lookup_ipc import CacheLookup, LookupServer, register_local
from nencache.integrations.paged import PagedKV
from nencache.integrations.vllm import connector_settings, model_identity, request_salt
from nencache.integrations.vllm_scheduler import ConnectorScheduler, ScheduledRequest, StepPlan
from nencache.integrations.vllm_worker import ConnectorWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
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


class NenCacheConnectorV1(KVConnectorBase_V1):
    """Prefix reuse across requests, restarts and machines through NenCache's tiers."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        overrides, options = connector_settings(getattr(transfer, "kv_connector_extra_config", None))
        self._config = load_config(overrides=overrides).config
        self._async_load = bool(options.get("async_load", False))
        self._piece_tokens = int(options.get("piece_tokens", 0)) or None
        self._block_size = vllm_config.cache_config.block_size
        parallel = vllm_config.parallel_config
        self._engine_key = f"{transfer.engine_id}/dp{getattr(parallel, 'data_parallel_rank', 0)}"
        self._scheduler: ConnectorScheduler | None = None
        self._lookup: CacheLookup | None = None
        self._worker: ConnectorWorker | None = None
        self._server: LookupServer | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._lookup = CacheLookup(self._engine_key)
            self._scheduler = ConnectorScheduler(
                self._lookup, block_size=self._block_size, chunk_size=self._config.chunk_size,
                save_unfull_chunk=self._config.save_unfull_chunk, async_load=self._async_load,
                can_load=transfer.kv_role != "kv_producer", can_save=transfer.kv_role != "kv_consumer")

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    # --- worker side --------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks = getattr(self._kv_cache_config, "num_blocks", None)
        paged = PagedKV.from_named(kv_caches, self._block_size, num_blocks=num_blocks)
        tp_rank, tp_size, pp_rank = _parallel_ranks()
        model_id, fingerprint = model_identity(self._vllm_config)
        extra = f"tp={tp_rank}/{tp_size};pp={pp_rank};layers={paged.layout.num_layers}"
        cache = KVCache(self._config, paged.layout, model_id, fingerprint=fingerprint, extra=extra)
        self._worker = ConnectorWorker(cache, paged, async_load=self._async_load, piece_tokens=self._piece_tokens)
        if tp_rank == 0 and pp_rank == 0:
            register_local(self._engine_key, cache)
            try:
                self._server = LookupServer(cache, self._engine_key)
            except OSError as exc:
                log.warning("NenCache lookup server could not start (%r); only in-process lookups will hit", exc)
        log.info("NenCache connector: %d layers, layout %s, chunk %d tokens", paged.layout.num_layers,
                 paged.layout.describe(), cache.chunk_size)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        if self._worker is not None and self.has_connector_metadata():
            self._worker.start_load(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # every layer is loaded in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return  # whole prompts are saved in wait_for_save

    def wait_for_save(self) -> None:
        if self._worker is not None and self.has_connector_metadata():
            self._worker.save(self._plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return (None, None) if self._worker is None else self._worker.finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set() if self._worker is None else self._worker.load_errors()

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._worker is not None:
            register_local(self._engine_key, None)
            self._worker.close()
            self._worker.cache.close()
        if self._lookup is not None:
            self._lookup.close()

    # --- scheduler side ---------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.match(request.request_id, request.prompt_token_ids, num_computed_tokens,
                                     salt=request_salt(request))

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self._scheduler is not None
        groups = blocks.get_block_ids()
        self._scheduler.allocated(request.request_id, groups[0] if groups else [], num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._scheduler is not None
        scheduled = scheduler_output.num_scheduled_tokens
        new = [ScheduledRequest(r.req_id, r.num_computed_tokens, scheduled.get(r.req_id, 0), _group0(r.block_ids),
                                r.prompt_token_ids) for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
        if not resumed and getattr(cached, "resumed_from_preemption", None):  # vLLM before resumed_req_ids
            resumed = {r for r, flag in zip(cached.req_ids, cached.resumed_from_preemption) if flag}
        running = [ScheduledRequest(req_id, cached.num_computed_tokens[i], scheduled.get(req_id, 0),
                                    _group0(cached.new_block_ids[i]), resumed=req_id in resumed)
                   for i, req_id in enumerate(cached.req_ids)]
        plan = self._scheduler.build(new, running, scheduler_output.finished_req_ids)
        return NenCacheConnectorMetadata(plan)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        if self._scheduler is not None:
            self._scheduler.worker_report(connector_output.finished_recving or (),
                                          getattr(connector_output, "invalid_block_ids", None) or ())

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is None:
            return False, None
        return self._scheduler.finished(request.request_id), None

    # --- internals ----------------------------------------------------------------------------------------
    def _plan(self) -> StepPlan:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, NenCacheConnectorMetadata)
        return metadata.plan


def _group0(block_ids: Any) -> list[int] | None:
    """Block ids of the first (only) KV cache group, from vLLM's per-group tuple."""
    if block_ids is None:
        return None
    if block_ids and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0])
    return list(block_ids)


def _parallel_ranks() -> tuple[int, int, int]:
    """(tensor-parallel rank, tensor-parallel size, pipeline rank) of this worker."""
    try:
        from vllm.distributed.parallel_state import (
            get_pp_group,
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(), get_pp_group().rank_in_group
    except Exception:  # not initialised (single process)
        return 0, 1, 0
