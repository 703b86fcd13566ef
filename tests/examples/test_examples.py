"""Every script of examples/ runs, scaled down (`--tiny`: a two-layer random model), and shows the cache at work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_util import RedisClusterProcs, RedisServer, redis_cluster, redis_server  # noqa: F401

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytest.importorskip("transformers")


def run(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=clean | (env or {}), cwd=EXAMPLES.parent)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def cached_counts(text: str) -> list[tuple[int, int]]:
    """(cached, prompt) of each engine, from `cached=A prompt=B` or `A of B prompt tokens` lines."""
    pairs = re.findall(r"cached=(\d+) prompt=(\d+)", text) or re.findall(r"(\d+) of (\d+) prompt tokens", text)
    return [(int(a), int(b)) for a, b in pairs]


def test_transformers_with_a_disk_tier_second_run_reads_from_disk(tmp_path: Path) -> None:
    first = cached_counts(run("transformers_disk.py", "--tiny", "--disk", str(tmp_path / "kv")))
    second = cached_counts(run("transformers_disk.py", "--tiny", "--disk", str(tmp_path / "kv")))
    assert first[0][0] == 0
    cached, prompt = second[0]
    assert cached == prompt - 1  # all of the prompt but the token the model must compute
    assert any((tmp_path / "kv").rglob("*")), "nothing on disk"


def test_two_engines_share_one_nencache_server() -> None:
    out = run("two_engines_one_server.py", "--tiny")
    (first, prompt), (second, _) = cached_counts(out)
    assert first == 0 and second == prompt - 1
    assert re.search(r"server: nencache://127\.0\.0\.1:\d+", out)


@pytest.mark.redis
def test_redis_cluster_as_the_shared_tier(redis_cluster: RedisClusterProcs) -> None:  # noqa: F811
    (first, prompt), (second, _) = cached_counts(run("redis_cluster.py", "--tiny", "--url", redis_cluster.url))
    assert first == 0 and second == prompt - 1


@pytest.mark.redis
def test_p2p_between_two_engines(redis_server: RedisServer) -> None:  # noqa: F811
    out = run("p2p_two_engines.py", "--tiny", "--index", redis_server.url)
    assert re.search(r"engine A holds the document's KV and serves it at 127\.0\.0\.1:\d+", out)
    [(cached, prompt)] = cached_counts(out)
    assert cached == prompt - 1  # everything came from engine A: engine B has no other tier


def test_an_lmcache_config_file_works_unchanged(tmp_path: Path) -> None:
    out = run("lmcache_config.py", env={"LMCACHE_CONFIG_FILE": str(EXAMPLES / "lmcache_config.yaml"),
                                         "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.05",  # a small pool for the test
                                         "LMCACHE_LOCAL_DISK": f"file://{tmp_path}/"})
    assert re.search(r"cpu_size\s+50000000\s+env LMCACHE_MAX_LOCAL_CPU_SIZE", out)
    assert re.search(r"disk_size\s+5000000000\s+file \S+lmcache_config.yaml \(LMCache key max_local_disk_size\)", out)
    assert "remote_codec         raw" in out and "(LMCache key remote_serde)" in out
    assert "stored 778 tokens; lookup finds 778; retrieved KV identical: True" in out
    assert "LMCache setting 'save_decode_cache'" in out and "is ignored" in out
