"""`NenCacheConnectorV1` driven through vLLM's calls, against a stand-in of vLLM's `KVConnectorBase_V1`.

The stand-in reproduces the base class members the connector relies on (vLLM's
`distributed/kv_transfer/kv_connector/v1/base.py`: constructor, role, metadata binding); the test checks
the translation of vLLM's objects (Request, KVCacheBlocks, SchedulerOutput, KVConnectorOutput).
"""

from __future__ import annotations

import enum
import sys
import types
from abc import ABC
from types import SimpleNamespace

import pytest
import torch

from nencache.integrations.paged import PagedKV, slot_mapping

BLOCK, CHUNK, LAYERS, HEADS, DIM = 16, 32, 2, 2, 8


def install_vllm_stub(monkeypatch) -> None:
    class KVConnectorRole(enum.Enum):
        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata(ABC):  # noqa: B024
        pass

    class KVConnectorBase_V1(ABC):  # noqa: N801
        def __init__(self, vllm_config, role, kv_cache_config):
            self._connector_metadata = None
            self._vllm_config = vllm_config
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._kv_cache_config = kv_cache_config
            self._role = role

        def bind_connector_metadata(self, metadata):
            self._connector_metadata = metadata

        def clear_connector_metadata(self):
            self._connector_metadata = None

        def _get_connector_metadata(self):
            assert self._connector_metadata is not None
            return self._connector_metadata

        def has_connector_metadata(self):
            return self._connector_metadata is not None

    names = ["vllm", "vllm.distributed", "vllm.distributed.kv_transfer", "vllm.distributed.kv_transfer.kv_connector",
             "vllm.distributed.kv_transfer.kv_connector.v1", "vllm.distributed.kv_transfer.kv_connector.v1.base"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    base = sys.modules[names[-1]]
    base.KVConnectorRole, base.KVConnectorMetadata, base.KVConnectorBase_V1 = (
        KVConnectorRole, KVConnectorMetadata, KVConnectorBase_V1)
    monkeypatch.setitem(sys.modules, "nencache.integrations.vllm_connector", None)  # restored (or removed) after the test
    del sys.modules["nencache.integrations.vllm_connector"]


def vllm_config(engine_id: str) -> SimpleNamespace:
    transfer = SimpleNamespace(engine_id=engine_id, kv_role="kv_both", is_kv_producer=False,
                               kv_connector_extra_config={"nencache.chunk_size": CHUNK, "lmcache.max_local_cpu_size": 0.01})
    model = SimpleNamespace(model="tiny-model", revision=None, dtype=torch.float32, quantization=None, hf_config=None)
    return SimpleNamespace(kv_transfer_config=transfer, model_config=model,
                           cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto"),
                           parallel_config=SimpleNamespace(data_parallel_rank=0))


class Blocks:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_block_ids(self, allow_none: bool = False) -> tuple[list[int], ...]:
        return (list(self.ids),)


def request(req_id: str, prompt: list[int]) -> SimpleNamespace:
    return SimpleNamespace(request_id=req_id, prompt_token_ids=prompt, cache_salt=None, lora_request=None,
                           mm_features=[])


def scheduler_output(req_id: str, prompt: list[int], blocks: list[int], computed: int) -> SimpleNamespace:
    new = SimpleNamespace(req_id=req_id, prompt_token_ids=prompt, block_ids=(blocks,), num_computed_tokens=computed)
    cached = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    return SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=cached,
                           num_scheduled_tokens={req_id: len(prompt) - computed}, finished_req_ids=set())


def token_kv(tokens: list[int]) -> torch.Tensor:
    base = torch.tensor(tokens, dtype=torch.float32)[None, None, :, None, None]
    return base + torch.arange(LAYERS * 2 * HEADS * DIM, dtype=torch.float32).view(LAYERS, 2, 1, HEADS, DIM) / 100


def test_connector_shares_a_prefix_between_requests(monkeypatch) -> None:
    install_vllm_stub(monkeypatch)
    from nencache.integrations import vllm as facade

    connector_cls = facade.NenCacheConnectorV1
    role = sys.modules["vllm.distributed.kv_transfer.kv_connector.v1.base"].KVConnectorRole
    config = vllm_config("connector-test")
    layers = {f"model.layers.{i}.self_attn.attn": torch.zeros(2, 32, BLOCK, HEADS, DIM) for i in range(LAYERS)}
    worker = connector_cls(config, role.WORKER, SimpleNamespace(num_blocks=32))
    scheduler = connector_cls(config, role.SCHEDULER, SimpleNamespace(num_blocks=32))
    paged = PagedKV.from_named(layers, BLOCK)
    try:
        worker.register_kv_caches(layers)
        assert worker.requires_kv_delivery is False

        def step(req_id: str, prompt: list[int], blocks: list[int]) -> int:
            req = request(req_id, prompt)
            external, is_async = scheduler.get_num_new_matched_tokens(req, 0)
            assert is_async is False
            scheduler.update_state_after_alloc(req, Blocks(blocks), external)
            meta = scheduler.build_connector_meta(scheduler_output(req_id, prompt, blocks, external))
            worker.bind_connector_metadata(meta)
            worker.start_load_kv(SimpleNamespace())
            paged.scatter(slot_mapping(blocks, BLOCK, external, len(prompt)), token_kv(prompt)[:, :, external:])
            worker.wait_for_save()
            worker.clear_connector_metadata()
            assert worker.get_block_ids_with_load_errors() == set()
            assert worker.get_finished({req_id}) == (None, None)
            scheduler.update_connector_output(SimpleNamespace(finished_recving=None, invalid_block_ids=set()))
            assert scheduler.request_finished(req, blocks) == (False, None)
            return external

        shared = list(range(100, 100 + 2 * CHUNK))
        assert step("a", shared + [1, 2, 3], list(range(0, 5))) == 0
        blocks_b = list(range(10, 15))
        assert step("b", shared + [7, 8], blocks_b) == 2 * CHUNK
        second = shared + [7, 8]
        got = paged.gather(slot_mapping(blocks_b, BLOCK, 0, len(second)))
        assert torch.equal(got, token_kv(second))
    finally:
        scheduler.shutdown()
        worker.shutdown()


def test_facade_without_vllm_names_what_is_missing(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # importing vllm fails
    monkeypatch.setitem(sys.modules, "nencache.integrations.vllm_connector", None)  # restored (or removed) after the test
    del sys.modules["nencache.integrations.vllm_connector"]
    from nencache.integrations import vllm as facade

    with pytest.raises(ImportError, match="needs vLLM"):
        facade.NenCacheConnectorV1
    with pytest.raises(AttributeError):
        facade.SomethingElse
