"""Fixtures of the bench tests: a benchmark context at a tiny scale, with the run's own services."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from nencache.bench.context import BenchContext, Scale, find_lmcache
from nencache.bench.progress import Progress
from nencache.bench.services import Services
from nencache.config import CacheConfig

TINY = Scale(True, reps=2, chunks=2, samples=20, contexts=(256,), memory_tokens=1024, trace_requests=400,
             capacities=("5%",))


@pytest.fixture
def bench_context(tmp_path: Path) -> Iterator[BenchContext]:
    """A tiny-scale context against the default config: throwaway Redis and server, disk under tmp_path."""
    services = Services(None, None)
    progress = Progress(io.StringIO(), live=False)
    config = CacheConfig(disk_path=str(tmp_path / "disk"))
    ctx = BenchContext(config, TINY, tmp_path, progress, services, compare_lmcache=find_lmcache() is not None,
                       lmcache_python=find_lmcache())
    with progress:
        yield ctx
    services.close()
