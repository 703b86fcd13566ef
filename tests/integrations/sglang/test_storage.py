"""`NenCacheHiCacheStorage` as SGLang creates and calls it: built by SGLang's StorageBackendFactory from
the "dynamic" extra config, over SGLang's real host pools, bit-exact through the memory, disk and Redis
tiers, with SGLang's own metrics type and its per-pool (v2) calls; a failing tier is a miss."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from nencache.integrations.sglang.pages import HostPageLayout
from tests.redis_util import start_server

from .conftest import PAGE, create_storage, host_indices, random_pages, storage_config


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int16)


def page_bits(host, start: int) -> torch.Tensor:
    return bits(host.get_data_page(start, flat=True))


def chunk_bits(host, start: int) -> torch.Tensor:
    """The page in NenCache's chunk order, so pools of different layouts compare (see test_host_pages)."""
    return bits(HostPageLayout.of(host).to_chunk(host.get_data_page(start, flat=False)))


@pytest.mark.parametrize(("kind", "layout"), [("mha", "page_first"), ("mha", "page_head"), ("mla", "layer_first"),
                                              ("mla", "page_first_direct")])
def test_dynamic_factory_builds_it_and_every_call_round_trips(sglang, make_pool, kind, layout) -> None:
    host = make_pool(kind, layout)
    config = storage_config(sglang, {"nencache.cpu_size": "1MiB"}, mla=kind == "mla")
    storage = create_storage(sglang, host, config)
    assert isinstance(storage, sglang.hicache_storage.HiCacheStorage)
    sent = random_pages(host, [0, 4, 8])
    assert storage.batch_set_v1(["k0", "k1"], host_indices([0, 4])) == [True, True]
    assert storage.batch_exists(["k0", "k1", "k2"]) == 2 and storage.exists("k1") and not storage.exists("k2")
    assert storage.batch_get_v1(["k1", "k2"], host_indices([12, 16])) == [True, False]
    assert torch.equal(page_bits(host, 12), bits(sent[1]))

    # the older per-page calls, as HiCacheController's generic path makes them
    assert storage.batch_set(["k3"], [host.get_data_page(8)])
    targets = [host.get_dummy_flat_data_page() for _ in range(3)]
    got = storage.batch_get(["k0", "k3", "k9"], targets)
    assert got[0] is targets[0] and torch.equal(bits(got[0]), bits(sent[0])) and got[2] is None
    assert torch.equal(bits(storage.get("k3")), bits(sent[2])) and storage.set("k4", host.get_data_page(0))
    assert storage.nencache_stats()["kv"]["stored_pages"] == 4
    storage.clear()
    assert storage.batch_exists(["k0"]) == 0
    storage.close()


def test_get_stats_is_sglangs_storage_metrics_and_feeds_its_collector(sglang, make_pool) -> None:
    host = make_pool("mha", "page_first")
    quiet = create_storage(sglang, host, storage_config(sglang, {"nencache.cpu_size": "1MiB"}))
    empty = quiet.get_stats()
    assert isinstance(empty, sglang.metrics.StorageMetrics) and empty.prefetch_pgs == empty.backup_pgs == []
    quiet.close()

    storage = create_storage(sglang, host, storage_config(sglang, {"nencache.cpu_size": "1MiB"}, metrics=True))
    random_pages(host, [0, 4, 8])
    storage.batch_set_v1(["a", "b", "c"], host_indices([0, 4, 8]))
    storage.batch_get_v1(["a", "b", "zz"], host_indices([12, 16, 20]))
    metrics = storage.get_stats()
    assert isinstance(metrics, sglang.metrics.StorageMetrics)
    assert metrics.backup_pgs == [3] and metrics.prefetch_pgs == [2]
    assert len(metrics.backup_bandwidth) == len(metrics.prefetch_bandwidth) == 1 and metrics.prefetch_bandwidth[0] > 0
    assert storage.get_stats().backup_pgs == []  # drained, as SGLang's other backends do
    storage.batch_set_v1(["d"], host_indices([0]))
    collector = sglang.metrics.StorageMetricsCollector(labels={"nencache_test": "storage"})
    collector.log_storage_metrics(storage.get_stats())  # what --enable-storage-metrics does; a dict crashed it
    samples = {s.name: s.value for m in collector.histogram_backup_pgs.collect() for s in m.samples
               if s.labels.get("nencache_test") == "storage"}
    assert samples["sglang:backup_pgs_count"] == 1 and samples["sglang:backup_pgs_sum"] == 1
    storage.close()


def test_mla_pages_are_shared_by_tensor_parallel_ranks_and_survive_a_restart(sglang, make_pool, tmp_path) -> None:
    extra = {"nencache.local_cpu": False, "nencache.disk_path": str(tmp_path)}
    writer_host, reader_host = make_pool("mla", "page_first"), make_pool("mla", "layer_first")
    writer = create_storage(sglang, writer_host, storage_config(sglang, extra, mla=True, tp_rank=0, tp_size=2))
    random_pages(writer_host, [0, 4])
    assert writer.batch_set_v1(["m0", "m1"], host_indices([0, 4])) == [True, True]
    writer.close()
    # another rank of the same model, another host layout, a new process's backend: same pages
    reader = create_storage(sglang, reader_host, storage_config(sglang, extra, mla=True, tp_rank=1, tp_size=2))
    assert reader.batch_exists(["m0", "m1"]) == 2
    assert reader.batch_get_v1(["m1", "m0"], host_indices([20, 24])) == [True, True]
    assert torch.equal(chunk_bits(reader_host, 20), chunk_bits(writer_host, 4))
    assert torch.equal(chunk_bits(reader_host, 24), chunk_bits(writer_host, 0))
    reader.close()
    # MHA pages are per rank: another rank's shard never matches
    mha_host = make_pool("mha", "page_first")
    rank0 = create_storage(sglang, mha_host, storage_config(sglang, extra, tp_rank=0, tp_size=2))
    random_pages(mha_host, [0])
    rank0.batch_set_v1(["s0"], host_indices([0]))
    rank0.close()
    rank1 = create_storage(sglang, mha_host, storage_config(sglang, extra, tp_rank=1, tp_size=2))
    assert rank1.batch_exists(["s0"]) == 0
    rank1.close()


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_disk_serves_after_memory_is_lost_and_a_corrupt_page_is_a_miss(sglang, make_pool, tmp_path, kind) -> None:
    host = make_pool(kind, "page_first")
    extra = {"nencache.cpu_size": "1MiB", "nencache.disk_path": str(tmp_path)}
    storage = create_storage(sglang, host, storage_config(sglang, extra, mla=kind == "mla"))
    sent = random_pages(host, [0, 4])
    assert storage.batch_set_v1(["d0", "d1"], host_indices([0, 4])) == [True, True]
    store = storage.backends["kv"].store
    assert store.flush(10)  # pages reach the disk behind the set's acknowledgement
    store.memory.clear()
    assert storage.batch_get_v1(["d0"], host_indices([8])) == [True]  # from disk, promoted
    assert torch.equal(page_bits(host, 8), bits(sent[0])) and store.memory.contains_prefix([store.key("d0")]) == 1
    victim = next(Path(tmp_path).rglob(store.key("d1").hex() + "*"))
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0x40
    victim.write_bytes(bytes(raw))
    before = page_bits(host, 12).clone()
    assert storage.batch_get_v1(["d1"], host_indices([12])) == [False]  # never served, never raised
    assert torch.equal(page_bits(host, 12), before)
    assert storage.batch_exists(["d0", "d1"]) == 1
    storage.close()


def test_redis_round_trip_then_redis_killed_is_a_miss(sglang, make_pool, tmp_path) -> None:
    server = start_server(tmp_path / "redis")
    try:
        extra = {"nencache.local_cpu": False, "nencache.remote_url": server.url}
        host = make_pool("mha", "layer_first")
        storage = create_storage(sglang, host, storage_config(sglang, extra))
        sent = random_pages(host, [0, 4])
        assert storage.batch_set_v1(["r0", "r1"], host_indices([0, 4])) == [True, True]
        assert storage.backends["kv"].store.flush(10)  # in Redis behind the set's acknowledgement
        other_host = make_pool("mha", "page_head")
        other = create_storage(sglang, other_host, storage_config(sglang, extra))
        assert other.batch_get_v1(["r0", "r1"], host_indices([8, 12])) == [True, True]
        assert torch.equal(chunk_bits(other_host, 8), chunk_bits(host, 0)) and other.exists("r0")
        assert torch.equal(chunk_bits(other_host, 12), chunk_bits(host, 4))
        assert torch.equal(bits(other.get("r1")), bits(other_host.get_data_page(12))) and other.exists("r0")
        assert torch.equal(bits(storage.get("r1")), bits(sent[1]))
        server.kill()
        assert storage.batch_exists(["r0"]) == 0
        assert storage.batch_get_v1(["r0"], host_indices([8])) == [False]
        storage.batch_set_v1(["r2"], host_indices([0]))  # the Redis tier drops writes while it is down
        storage.batch_set(["r3"], [host.get_data_page(0)])
        assert not storage.backends["kv"].store.flush(10)  # written behind, and lost: counted
        assert storage.get("r0") is None and storage.batch_exists(["r2"]) == 0 and not storage.exists("r3")
        redis = storage.nencache_stats()["kv"]["tiers"]["redis"]
        assert redis["dropped"] >= 2 and redis["errors"] >= 1
        storage.close()
        other.close()
    finally:
        server.kill()


def mamba_pool(sglang):
    """A real Mamba state host pool: its pages are not KV pages."""
    info = sglang.device_pool_info.MambaStateBufferInfo(temporal=torch.zeros(2, 9, 4, 4),
                                                        conv=(torch.zeros(2, 9, 3, 4),))
    return sglang.mamba.MambaPoolHost(info, 2.0, 0, device_capacity=8, pin_memory=False, layout="page_first")


def test_per_pool_v2_calls_for_hybrid_models(sglang, make_pool, caplog) -> None:
    names = sglang.hicache_storage.PoolName
    policy = sglang.hicache_storage.PoolHitPolicy
    transfer = sglang.hicache_storage.PoolTransfer
    kv_host, swa_host = make_pool("mha", "page_first"), make_pool("mha", "layer_first")
    storage = sglang.backend_factory.StorageBackendFactory.create_backend(
        "dynamic", storage_config(sglang, {"nencache.cpu_size": "1MiB"}), kv_host)
    storage.register_mem_pool_host(kv_host)  # as HybridCacheController attaches: the anchor, then every entry
    with caplog.at_level(logging.WARNING, logger="nencache.sglang"):
        for pool, name in [(kv_host, names.KV), (swa_host, names.SWA), (mamba_pool(sglang), names.MAMBA)]:
            storage.register_mem_host_pool_v2(pool, name)
        storage.on_host_pools_registered()
    assert "mamba host pool (MambaPoolHost) is not stored" in caplog.text
    assert storage.backends["kv"] is storage.backends[names.KV]
    memory = [b.store.memory.pool.capacity_bytes for b in (storage.backends["kv"], storage.backends["swa"])]
    assert sum(memory) <= 2**20 and min(memory) > 0  # one cpu_size, shared

    keys = ["p0", "p1", "p2"]
    random_pages(kv_host, [0, 4, 8])
    sent = random_pages(swa_host, [0, 4, 8], seed=3)
    assert storage.batch_set_v1(keys, host_indices([0, 4, 8])) == [True] * 3
    done = storage.batch_set_v2([transfer(name=names.SWA, host_indices=host_indices([4, 8]), keys=keys[1:]),
                                 transfer(name=names.MAMBA, host_indices=torch.arange(2), keys=keys[1:])])
    assert done == {names.SWA: [True, True], names.MAMBA: [False, False]}

    trailing = transfer(name=names.SWA, keys=keys[-1:], hit_policy=policy.TRAILING_PAGES)  # a 1-page window
    result = storage.batch_exists_v2(keys, [trailing])
    assert isinstance(result, sglang.hicache_storage.PoolTransferResult)
    assert result.kv_hit_pages == 3 and result.restorable_prefix_pages == [2, 3]  # SWA page p0 was never stored
    wide = transfer(name=names.SWA, keys=keys[-2:], hit_policy=policy.TRAILING_PAGES)  # a 2-page window
    assert storage.batch_exists_v2(keys, [wide]).restorable_prefix_pages == [3]
    every = transfer(name=names.SWA, keys=keys, hit_policy=policy.ALL_PAGES)
    assert storage.batch_exists_v2(keys, [every]).kv_hit_pages == 0
    mamba = transfer(name=names.MAMBA, keys=keys[-1:], hit_policy=policy.TRAILING_PAGES)
    assert storage.batch_exists_v2(keys, [trailing, mamba]).kv_hit_pages == 0  # a pool NenCache cannot hold: a miss

    got = storage.batch_get_v2([transfer(name=names.SWA, host_indices=host_indices([20, 24]), keys=keys[1:]),
                                transfer(name=names.SWA, host_indices=host_indices([28]), keys=keys[1:])])
    assert got == {names.SWA: [False, False]}  # the second transfer's indices do not fit its keys: refused
    got = storage.batch_get_v2([transfer(name=names.SWA, host_indices=host_indices([20, 24]), keys=keys[1:])])
    assert got == {names.SWA: [True, True]}
    assert torch.equal(page_bits(swa_host, 20), bits(sent[1])) and torch.equal(page_bits(swa_host, 24), bits(sent[2]))
    assert storage.batch_get_v2([transfer(name=names.MAMBA, host_indices=torch.arange(1), keys=keys[:1])]) == {
        names.MAMBA: [False]}
    storage.close()


def test_extra_config_takes_nencache_keys_and_names_what_it_ignores(sglang, make_pool, caplog, tmp_path) -> None:
    host = make_pool("mha", "page_first")
    extra = {"cpu_size": "2MiB", "lmcache.local_disk": str(tmp_path), "nencache.tenant": "t1", "colour": "blue"}
    with caplog.at_level(logging.WARNING, logger="nencache.sglang"):
        storage = create_storage(sglang, host, storage_config(sglang, extra))
    assert int(storage.config.tiers.cpu.size) == 2 * 2**20 and storage.config.tenant == "t1"
    assert storage.config.tiers.disk.path == str(tmp_path)
    assert "'colour' is not a NenCache setting" in caplog.text and "cpu_size" not in caplog.text
    storage.close()
    with pytest.raises(Exception, match="cpu_sise"):
        create_storage(sglang, host, storage_config(sglang, {"nencache.cpu_sise": "1MiB"}))
