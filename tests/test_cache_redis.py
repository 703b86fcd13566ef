"""KVCache with a real Redis remote tier: sharing between processes, Redis killed and restarted."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from nencache import CacheConfig, KVCache, KVLayout
from tests.redis_util import start_server

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16)


def make_kv(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape(tokens), generator=torch.Generator().manual_seed(seed)).to(LAYOUT.dtype)


def make_cache(url: str) -> KVCache:
    return KVCache(CacheConfig(chunk_size=16, cpu_size="8MiB", remote_url=url, remote_timeout=0.2), LAYOUT,
                   model_id="shared-model")


def test_another_process_retrieves_what_this_one_stored(tmp_path: Path) -> None:
    server = start_server(tmp_path / "redis")
    try:
        with make_cache(server.url) as cache:
            cache.store(list(range(100)), make_kv(100, seed=7))
            assert cache.flush(timeout=10)
        script = textwrap.dedent(f"""
            import torch
            from nencache import CacheConfig, KVCache, KVLayout
            layout = KVLayout(4, 2, 16, torch.bfloat16)
            cache = KVCache(CacheConfig(chunk_size=16, cpu_size="8MiB", remote_url={server.url!r}), layout,
                            model_id="shared-model")
            ids = list(range(100))
            assert cache.lookup(ids) == 100, cache.lookup(ids)
            kv = cache.retrieve(ids)
            expected = torch.randn(layout.shape(100), generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
            assert torch.equal(kv, expected)
            assert KVCache(CacheConfig(chunk_size=16, cpu_size="8MiB", remote_url={server.url!r}), layout,
                           model_id="another-model").lookup(ids) == 0
            print("OK")
        """)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip().endswith("OK"), done.stderr
    finally:
        server.kill()


def test_redis_killed_mid_run_then_back(tmp_path: Path) -> None:
    server = start_server(tmp_path / "redis")
    with make_cache(server.url) as cache:
        local = list(range(64))
        cache.store(local, make_kv(64, seed=1))
        cache.flush(timeout=10)
        server.kill()
        for round_ in range(20):  # stores and retrieves go on; no exception reaches the caller
            ids = list(range(1000 + round_ * 64, 1000 + round_ * 64 + 64))
            cache.store(ids, make_kv(64, seed=round_))
            assert cache.lookup(local) == 64
            assert torch.equal(cache.retrieve(local), make_kv(64, seed=1))
            assert cache.lookup(list(range(90_000, 90_032))) == 0
        cache.flush(timeout=10)
        assert cache.stats()["tiers"]["redis"]["errors"] + cache.stats()["tiers"]["redis"]["dropped"] > 0
        server.start()  # the same port again
        try:
            deadline = time.time() + 10
            ids = list(range(50_000, 50_032))
            while time.time() < deadline:
                cache.store(ids, make_kv(32, seed=99))
                cache.flush(timeout=5)
                cache.memory.clear()
                if cache.lookup(ids) == 32:
                    break
                cache.invalidate(ids)
                time.sleep(0.3)
            assert cache.lookup(ids) == 32, "the Redis tier was not used again after Redis came back"
            assert torch.equal(cache.retrieve(ids), make_kv(32, seed=99))
        finally:
            server.kill()
