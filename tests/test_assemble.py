"""Assembly: config -> tiers -> store. The registry is the only place URL schemes live; a new tier is one
registry line; tiers are ordered by the distance they declare; the core imports no server or P2P code."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nencache import CacheConfig, KVLayout, assemble
from nencache.errors import ConfigError
from nencache.tiers.base import Distance
from tests.test_store import DictTier

LAYOUT = KVLayout(2, 2, 8, torch.float16)


def test_a_new_remote_scheme_is_one_registry_line(monkeypatch) -> None:
    made: list[tuple[str, str]] = []

    def object_store(config: CacheConfig, namespace: str) -> DictTier:
        made.append((str(config.tiers.remote.url), namespace))
        return DictTier("s3", Distance.REMOTE)

    monkeypatch.setitem(assemble.REMOTE_SCHEMES, "s3", object_store)
    config = CacheConfig(cpu_size="1MiB", chunk_size=4, remote_url="s3://bucket/kv")
    built = assemble.build_store(config, LAYOUT, "ab" * 16)
    assert [one.tier.name for one in built.store.lower] == ["s3"] and made == [("s3://bucket/kv", "ab" * 16)]
    built.store.close()


def test_an_unknown_scheme_names_every_known_one() -> None:
    with pytest.raises(ConfigError) as caught:
        assemble.remote_tier(CacheConfig(remote_url="ftp://host/x"), "ab" * 16)
    message = str(caught.value)
    assert "'ftp'" in message and all(f"{scheme}://" in message for scheme in assemble.REMOTE_SCHEMES)


def test_disk_and_remote_come_in_distance_order(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(assemble.REMOTE_SCHEMES, "test", lambda config, namespace: DictTier("far", Distance.REMOTE))
    config = CacheConfig(cpu_size="1MiB", chunk_size=4, disk_path=str(tmp_path), disk_size="1MiB",
                         remote_url="test://x")
    built = assemble.build_store(config, LAYOUT, "ab" * 16)
    assert [(one.tier.name, one.tier.distance) for one in built.store.lower] == [
        ("disk", Distance.LOCAL), ("far", Distance.REMOTE)]
    built.store.close()
    given = [(DictTier("far", Distance.REMOTE), "raw"), (DictTier("near", Distance.LOCAL), "raw"),
             (DictTier("peer", Distance.PEER), "raw")]
    built = assemble.build_store(CacheConfig(cpu_size="1MiB", chunk_size=4), LAYOUT, "ab" * 16, lower=given)
    assert [one.tier.name for one in built.store.lower] == ["near", "peer", "far"]
    built.store.close()


def test_the_cache_and_its_core_import_no_server_and_no_p2p_code(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, torch
        from nencache import CacheConfig, KVCache, KVLayout
        config = CacheConfig(chunk_size=4, cpu_size="1MiB", disk_path={str(tmp_path)!r}, disk_size="1MiB")
        with KVCache(config, KVLayout(2, 2, 8, torch.float16), "m") as cache:
            cache.store(list(range(8)), torch.zeros((2, 2, 8, 2, 8), dtype=torch.float16))
            assert cache.flush(10) and cache.lookup(list(range(8))) == 8
        loaded = sorted(m for m in sys.modules if m.startswith(("nencache.server", "nencache.p2p")))
        print("LOADED", loaded)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in done.stdout, done.stdout + done.stderr
