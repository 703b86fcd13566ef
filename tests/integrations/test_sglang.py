"""The engine-free parts of the SGLang backend: the page store's tiers (a failing or corrupt tier is a
miss), the transfer log behind SGLang's storage metrics, and the message when SGLang is missing.
Tests against SGLang's own classes are in tests/integrations/sglang/."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from nencache import CacheConfig, KVLayout
from nencache.errors import LayoutError
from nencache.integrations.page_store import PageStore, page_namespace
from nencache.integrations.sglang.metrics import TransferLog
from nencache.tiers.base import Distance
from tests.dict_tier import DictTier

LAYOUT, PAGE = KVLayout(3, 2, 8, torch.bfloat16), 4


def make_store(config: CacheConfig, lower=None) -> PageStore:
    return PageStore.from_config(config, LAYOUT, PAGE, page_namespace("tiny-model", LAYOUT, PAGE, shard="mha"),
                                 lower=lower)


def pages(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(count)
    return [torch.randn(LAYOUT.shape(PAGE), generator=generator).to(torch.bfloat16) for _ in range(count)]


def test_lower_tier_serves_and_promotes_and_failures_are_misses() -> None:
    lower = DictTier("dict", Distance.REMOTE)
    store = make_store(CacheConfig(cpu_size="1MiB"), lower=[(lower, "raw")])
    sent = pages(2)
    assert store.put(["a", "b"], sent) == [True, True] and store.flush(10) and len(lower.blobs) == 2
    store.memory.clear()
    out = [torch.empty(LAYOUT.shape(PAGE), dtype=torch.bfloat16) for _ in range(2)]
    assert store.get_into(["a", "b"], out) == [True, True]  # from the lower tier, promoted
    assert all(torch.equal(o.view(torch.int16), s.view(torch.int16)) for o, s in zip(out, sent))
    assert store.memory.contains_prefix([store.key("a"), store.key("b")]) == 2
    assert store.exists_prefix(["a", "missing", "b"]) == 1

    store.memory.clear()
    key_b = store.key("b")
    lower.blobs[key_b] = lower.blobs[key_b][:-1] + bytes([lower.blobs[key_b][-1] ^ 1])
    assert store.get_into(["a", "b"], out) == [True, False]  # a corrupt page is dropped, never served
    assert key_b not in lower.blobs and store.counters["corrupt"] == 1

    store.memory.clear()
    lower.broken = True
    assert store.exists_prefix(["a"]) == 0 and store.get_into(["a"], out[:1]) == [False]
    assert store.put(["c"], sent[:1]) == [True]  # memory took it
    assert not store.flush(10) and store.stats()["write_failed_chunks"] == 1  # the tier below did not
    assert store.counters["tier_errors"] >= 3
    with pytest.raises(LayoutError):
        store.put(["d"], [torch.zeros(2, dtype=torch.bfloat16)])
    store.close()


def test_no_memory_tier_and_no_lower_tier_stores_nothing() -> None:
    store = make_store(CacheConfig(local_cpu=False))
    assert store.memory is None and store.put(["a"], pages(1)) == [False] and store.exists_prefix(["a"]) == 0


def test_namespace_separates_models_shards_and_tenants() -> None:
    keys = {page_namespace(model, LAYOUT, PAGE, shard=shard, tenant=tenant)
            for model in ("a", "b") for shard in ("mha/kv/tp=0/2", "mla-latent/kv") for tenant in ("", "t")}
    assert len(keys) == 8


def test_transfer_log_drains_what_it_recorded() -> None:
    log = TransferLog()
    log.record(False, 3, 3_000_000_000, 1.5)
    log.record(True, 2, 1_000, 0.0)
    prefetch, backup, prefetch_gbps, backup_gbps = log.drain()
    assert prefetch == [3] and backup == [2] and prefetch_gbps == [2.0] and backup_gbps[0] > 0
    assert log.drain() == ([], [], [], [])


def test_the_sglang_module_says_what_is_missing(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sglang.srt.mem_cache.hicache_storage", None)  # as if SGLang were absent
    monkeypatch.delitem(sys.modules, "nencache.integrations.sglang.storage", raising=False)
    with pytest.raises(ImportError, match="nencache.integrations.sglang.storage needs SGLang"):
        importlib.import_module("nencache.integrations.sglang.storage")
    for engine_free in ("pages", "backend", "metrics", "settings"):  # the rest of the package imports without it
        importlib.import_module(f"nencache.integrations.sglang.{engine_free}")
