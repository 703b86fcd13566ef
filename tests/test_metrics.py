"""A `KVCache`'s Prometheus metrics: on its own port (`metrics_port`) or in an engine's registry."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
import torch

from nencache import CacheConfig, KVCache, KVLayout
from nencache.errors import ConfigError
from nencache.metrics import register

prometheus = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=16, dtype=torch.bfloat16)


def kv(tokens: int) -> torch.Tensor:
    return torch.arange(LAYOUT.num_layers * 2 * tokens * 16, dtype=torch.float32).reshape(LAYOUT.shape(tokens)).to(
        LAYOUT.dtype)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in found.items() if n == name and all((k, w) in ls for k, w in labels.items())]
    assert matches, f"{name} {labels} not exposed"
    return sum(matches)


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return samples(reply.read().decode())


def test_metrics_port_serves_tier_counters_pool_use_and_load_save_histograms(tmp_path: Path) -> None:
    config = CacheConfig(chunk_size=16, cpu_size=LAYOUT.nbytes(16) * 4 + 256, disk_path=str(tmp_path), metrics_port=0)
    with KVCache(config, LAYOUT, "metrics-model") as cache:
        ids = list(range(100))
        cache.store(ids, kv(100))  # 7 chunks into a 4-page pool: evictions
        assert cache.flush(timeout=10)
        assert cache.lookup(ids) == 100
        cache.retrieve(ids)  # the evicted ones come back from disk
        found = scrape(cache._metrics.url)
        ns = cache.namespace.hex()[:16]
        assert value(found, "nencache_stored_chunks_total", model="metrics-model", namespace=ns) == 7
        assert value(found, "nencache_lookup_tokens_total") == 100 and value(found, "nencache_hit_tokens_total") == 100
        assert value(found, "nencache_tier_evicted_chunks_total", tier="memory") >= 3
        assert value(found, "nencache_tier_hits_total", tier="disk") >= 3
        assert value(found, "nencache_tier_stored_chunks_total", tier="disk") == 7
        assert value(found, "nencache_tier_read_bytes_total", tier="disk") > 0
        assert value(found, "nencache_pool_capacity_bytes") == cache.memory.pool.capacity_bytes
        assert 0 < value(found, "nencache_pool_used_bytes") <= value(found, "nencache_pool_capacity_bytes")
        assert value(found, "nencache_request_seconds_count", op="save") == 1
        assert value(found, "nencache_request_seconds_count", op="load") == 1
        assert value(found, "nencache_request_seconds_bucket", op="load", le="+Inf") == 1
        assert value(found, "nencache_tier_corrupt_total", tier="disk") == 0
        url = cache._metrics.url
    with pytest.raises(OSError):  # the last cache on the port closed it
        urllib.request.urlopen(url, timeout=2)


def test_caches_of_one_process_share_a_port_each_labelled_by_model() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = KVCache(CacheConfig(chunk_size=16, cpu_size="1MiB", metrics_port=port), LAYOUT, "model-a")
    second = KVCache(CacheConfig(chunk_size=16, cpu_size="1MiB", metrics_port=port), LAYOUT, "model-b")
    try:
        first.store(list(range(16)), kv(16))
        found = scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(found, "nencache_stored_chunks_total", model="model-a") == 1
        assert value(found, "nencache_stored_chunks_total", model="model-b") == 0
        first.close()
        found = scrape(f"http://127.0.0.1:{port}/metrics")
        assert not [n for (n, ls), _ in found.items() if ("model", "model-a") in ls]
    finally:
        first.close()
        second.close()


def test_a_port_in_use_is_a_clear_error_and_nothing_is_left_running() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics_port {port}"):
            KVCache(CacheConfig(chunk_size=16, cpu_size="1MiB", metrics_port=port), LAYOUT, "m")


def test_the_metrics_go_into_an_engines_own_registry() -> None:
    registry = prometheus.CollectorRegistry()
    with KVCache(CacheConfig(chunk_size=16, cpu_size="1MiB"), LAYOUT, "engine-model") as cache:
        register(cache, registry)
        cache.store(list(range(32)), kv(32))
        found = samples(prometheus.generate_latest(registry).decode())
        assert value(found, "nencache_stored_chunks_total", model="engine-model") == 2
        assert value(found, "nencache_tier_stored_chunks_total", tier="memory") == 2
