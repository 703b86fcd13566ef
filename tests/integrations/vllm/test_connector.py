"""`NenCacheConnectorV1` with vLLM's real classes: configs, KV cache specs, requests, stats, Prometheus.

What cannot run on this CPU (a hybrid mamba model needs vLLM's hybrid KV cache manager, which the CPU
platform turns off) is checked here with the real config and spec classes vLLM would pass.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from tests.integrations.vllm.test_scheduler import LAYERS, expected_kv

pytestmark = pytest.mark.vllm

BLOCK = 128


@pytest.fixture(scope="module")
def vllm_config(smollm2_dir) -> Any:
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    transfer = KVTransferConfig(kv_connector="NenCacheConnectorV1", kv_connector_module_path="nencache.integrations.vllm",
                                kv_role="kv_both", kv_connector_extra_config={"cpu_size": "64MiB", "chunk_size": 32})
    return EngineArgs(model=str(smollm2_dir), dtype="float32", enforce_eager=True, max_model_len=2048,
                      kv_transfer_config=transfer).create_engine_config()


def full(layers: list[str], **extra: Any) -> Any:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=3, head_size=64, dtype=torch.float32, **extra)
    return KVCacheGroupSpec(layers, spec)


def kv_cache_config(*groups: Any) -> Any:
    from vllm.v1.kv_cache_interface import KVCacheConfig

    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=list(groups))


def mamba(layers: list[str]) -> Any:
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec, MambaSpec

    return KVCacheGroupSpec(layers, MambaSpec(block_size=BLOCK, shapes=((4, 16), (8, 32)),
                                              dtypes=(torch.float32, torch.float32)))


def sliding(layers: list[str]) -> Any:
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec, SlidingWindowSpec

    return KVCacheGroupSpec(layers, SlidingWindowSpec(block_size=BLOCK, num_kv_heads=3, head_size=64,
                                                      dtype=torch.float32, sliding_window=512))


def test_served_group_follows_vllms_declared_groups(vllm_config) -> None:
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec, KVQuantMode, MLAAttentionSpec

    from nencache.integrations.vllm.declared import served_group

    group, why = served_group(kv_cache_config(full(["model.layers.0.attn", "model.layers.1.attn"])), vllm_config)
    assert group is not None and (group.index, group.block_size, group.latent) == (0, BLOCK, False) and why == ""
    mla = KVCacheGroupSpec(["model.layers.0.attn"], MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576,
                                                                     dtype=torch.float32))
    group, _ = served_group(kv_cache_config(mla), vllm_config)
    assert group is not None and group.latent
    cases = {
        "hybrid mamba": kv_cache_config(full(["a.0"]), mamba(["m.1"])),
        "sliding window groups": kv_cache_config(full(["a.0"]), sliding(["s.1"])),
        "sliding window only": kv_cache_config(sliding(["s.0"])),
        "quantized": kv_cache_config(full(["a.0"], kv_quant_mode=KVQuantMode.FP8_PER_TENSOR)),
        "no config": None,
    }
    for name, config in cases.items():
        group, why = served_group(config, vllm_config)
        assert group is None and why, name


def test_a_connector_for_a_hybrid_model_stands_aside_with_one_log_line(vllm_config, caplog) -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole, SupportsHMA
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from nencache.integrations.vllm.connector import NenCacheConnectorV1

    config = kv_cache_config(full(["model.layers.0.attn"]), mamba(["model.layers.1.mixer"]))
    with caplog.at_level(logging.WARNING, logger="nencache.vllm"):
        scheduler = NenCacheConnectorV1(vllm_config, KVConnectorRole.SCHEDULER, config)
        worker = NenCacheConnectorV1(vllm_config, KVConnectorRole.WORKER, config)
    assert isinstance(scheduler, SupportsHMA), "vLLM keeps its hybrid KV cache manager on for this connector"
    disabled = [r.getMessage() for r in caplog.records if "NenCache connector disabled" in r.getMessage()]
    assert len(disabled) == 2 and "2 groups" in disabled[0]  # one line per role (scheduler, worker)
    request = Request("r", list(range(600)), SamplingParams(max_tokens=4), None)
    scheduler.on_new_request(request)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    assert scheduler.request_finished_all_groups(request, ([1, 2], [3])) == (False, None)
    assert scheduler.build_connector_meta(None).plan.requests == []
    worker.register_kv_caches({"model.layers.0.attn": torch.zeros(4, 3, BLOCK, 128)})
    assert worker.get_finished(set()) == (None, None) and worker.get_block_ids_with_load_errors() == set()
    assert worker.get_kv_connector_stats() is None
    scheduler.shutdown()
    worker.shutdown()


def test_scheduler_side_with_real_requests_reports_lookups_in_vllms_stats(vllm_config, monkeypatch) -> None:
    """The scheduler-role connector over an in-process worker's pins (as with one worker per process)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    from nencache import CacheConfig, KVCache, KVLayout
    from nencache.integrations.vllm.connector import NenCacheConnectorV1
    from nencache.integrations.vllm.lookup import PinBook, register_local

    scheduler = NenCacheConnectorV1(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config(full(["model.layers.0.attn"])))
    with KVCache(CacheConfig(chunk_size=32, cpu_size="8MiB"), KVLayout(LAYERS, 2, 8, torch.float32), "m") as cache:
        prompt = list(range(1000, 1000 + 100))
        cache.store(prompt, expected_kv(prompt))
        book = PinBook(cache)
        register_local(scheduler._engine_key, 0, book)
        try:
            request = Request("req-1", prompt + [7, 8, 9], SamplingParams(max_tokens=4), None)
            scheduler.on_new_request(request)  # queued: the lookup (and pin) starts now
            external, is_async = scheduler.get_num_new_matched_tokens(request, 0)
            assert (external, is_async) == (100, False)  # 3 whole chunks of 32 and the stored 4-token partial one
            assert len(book) == 1
            salted = Request("req-2", prompt, SamplingParams(max_tokens=4), None, cache_salt="tenant-b")
            assert scheduler.get_num_new_matched_tokens(salted, 0) == (0, False)
            stats = scheduler.get_kv_connector_stats()
            assert stats is not None and stats.data["counters"]["lookups"] == 2
            assert stats.data["counters"]["hit_tokens"] == 100
            assert scheduler.request_finished(request, [])[0] is False
        finally:
            register_local(scheduler._engine_key, 0, None)
            scheduler.shutdown()


def test_stats_aggregate_and_reach_prometheus(vllm_config) -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from nencache.integrations.vllm.connector import NenCacheConnectorV1

    first = NenCacheConnectorV1.build_kv_connector_stats()
    first.add("loaded_tokens", 100)
    first.observe("load_seconds", [0.01])
    second = NenCacheConnectorV1.build_kv_connector_stats(data={"counters": {"loaded_tokens": 20, "stored_tokens": 5},
                                                                 "timings": {"load_seconds": [0.02]}})
    merged = first.aggregate(second)
    assert merged.reduce() == {"loaded_tokens": 120, "stored_tokens": 5, "load_seconds_count": 2,
                               "load_seconds_mean": 0.015}
    registry = CollectorRegistry()

    def bound(cls: type) -> type:
        class Registered(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, registry=registry, **kwargs)

        return Registered

    prom = NenCacheConnectorV1.build_prom_metrics(
        vllm_config, {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)},
        ["model_name", "engine"], {0: ["smollm2", "0"]})
    prom.observe(merged.data, engine_idx=0)
    labels = {"model_name": "smollm2", "engine": "0"}
    assert registry.get_sample_value("vllm:nencache_loaded_tokens_total", labels) == 120
    assert registry.get_sample_value("vllm:nencache_load_seconds_count", labels) == 2


def test_a_worker_that_cannot_serve_still_hands_back_blocks_kept_for_final_saves(vllm_config, caplog) -> None:
    """If the worker cannot read its buffers (here: vLLM registered none of the group's layers), a final
    save the scheduler planned is reported done, so vLLM frees the blocks it kept for it."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from nencache.integrations.vllm.connector import NenCacheConnectorMetadata, NenCacheConnectorV1
    from nencache.integrations.vllm.scheduler import RequestWork, SaveSpec, StepPlan

    worker = NenCacheConnectorV1(vllm_config, KVConnectorRole.WORKER, kv_cache_config(full(["model.layers.0.attn"])))
    with caplog.at_level(logging.WARNING, logger="nencache.vllm"):
        worker.register_kv_caches({"model.layers.9.other": torch.zeros(4, 3, BLOCK, 128)})
    assert any("disabled" in r.getMessage() for r in caplog.records)
    plan = StepPlan([RequestWork("done", [1, 2, 3], [0], save=SaveSpec(0, final=True)),
                     RequestWork("prefill", [1, 2, 3], [1], save=SaveSpec(0))])
    worker.bind_connector_metadata(NenCacheConnectorMetadata(plan))
    worker.start_load_kv(None)
    worker.wait_for_save()
    assert worker.get_finished({"done"}) == ({"done"}, None)
    worker.clear_connector_metadata()
    assert worker.get_finished(set()) == (None, None)
    worker.shutdown()
