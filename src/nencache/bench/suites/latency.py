"""`latency`: p50 and p99 of one access to a small chunk, per tier, against NenCache's stated targets.

The chunk is 16 tokens of a small model's KV (2 layers x 1 KV head x 64, bf16: 8 KiB). Samples are
interleaved: each round reads the chunk once from every tier in turn.
- CPU memory tier: `MemoryTier.read_into` (lease, copy out, release). Target p50 < 10 us, judged on
  the interleaved samples: each follows the other tiers' calls, which leave the CPU's caches cold for
  this one (as an engine's forward pass does between two retrieves). Beside it, the same read back to
  back (warm caches, the figure microbenchmarks usually give), and `KVCache.retrieve` of the same
  tokens (key hashing and the pool lookup included).
- disk tier: `DiskTier.get` with the chunk's file evicted from the page cache first (posix_fadvise),
  so every read comes from the device. Target p50 < 100 us on NVMe, < 1 ms on other disks. Beside
  it, the same read from the page cache.
- Redis and the NenCache server (no target): `get` of the one chunk over the socket, and out of the
  server's shared pool.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nencache.bench.context import BenchContext, scratch_cleanup
from nencache.bench.kv import chunk_blobs, random_kv, token_ids
from nencache.bench.machine import disk_kind
from nencache.bench.results import Plot, Series, SuiteResult, Table, TargetCheck, fmt, percentile
from nencache.cache import KVCache
from nencache.config import CacheConfig
from nencache.keys import chunk_keys
from nencache.layout import KVLayout

SMALL = KVLayout(num_layers=2, num_kv_heads=1, head_dim=64, dtype=torch.bfloat16)
TOKENS = 16
CPU_TARGET_US = 10.0
DISK_TARGETS_US = {"nvme": (100.0, "NVMe"), "memory": (100.0, "tmpfs (memory)")}
OTHER_DISK_US = (1000.0, "disk")


def _evict_file(path: Path) -> None:
    """Drop `path`'s pages from the page cache (the next read goes to the device)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def run(ctx: BenchContext) -> SuiteResult:
    from nencache.tiers.disk.tier import DiskTier
    from nencache.tiers.disk.index import chunk_name
    from nencache.assemble import remote_tier

    result = SuiteResult("latency", "Single small-chunk access latency per tier")
    samples: dict[str, list[float]] = {}
    probes: dict[str, Callable[[], float]] = {}
    closers: list[Callable[[], None]] = []
    gen = torch.Generator().manual_seed(3)
    ids, kv = token_ids(TOKENS, gen), random_kv(SMALL, TOKENS, gen)
    out = torch.empty_like(kv)
    ctx.progress.step("setting up the tiers")
    cache = KVCache(CacheConfig(chunk_size=TOKENS, cpu_size=64 * SMALL.nbytes(TOKENS), pin_memory=ctx.config.tiers.cpu.pin_memory),
                    SMALL, "nencache-bench-latency")
    closers.append(cache.close)
    cache.store(ids, kv)
    [key] = chunk_keys(ids, TOKENS, cache.namespace)
    probes["CPU memory tier (read_into)"] = lambda: _timed(lambda: cache.memory.read_into(key, out))
    probes["CPU: KVCache.retrieve"] = lambda: _timed(lambda: cache.retrieve(ids, out=out))

    work, where = ctx.disk_dir()
    closers.append(lambda: scratch_cleanup(work))
    kind = disk_kind(work)
    disk_target, disk_label = DISK_TARGETS_US.get(kind, OTHER_DISK_US)
    blobs = chunk_blobs(SMALL, TOKENS, 1)
    disk = DiskTier(work, "0a", 1 << 24, io_threads=ctx.config.tiers.io_threads)
    closers.append(disk.close)
    disk.put(blobs)
    disk.flush()
    disk_key = blobs[0][0]
    disk_file = disk.path / chunk_name(disk_key)

    def cold_disk() -> float:
        _evict_file(disk_file)
        return _timed(lambda: disk.get([disk_key]))

    probes["disk tier, from the device"] = cold_disk
    probes["disk tier, from the page cache"] = lambda: _timed(lambda: disk.get([disk_key]))
    for label, service, shared in (("Redis", ctx.services.redis(), True), ("server, socket", ctx.services.server(), False),
                                   ("server, shared pool", ctx.services.server(), True)):
        if service is None:
            result.notes.append(f"{label}: not measured (no such service here)")
            continue
        tier = remote_tier(ctx.config.replace(remote_url=service.url, remote_timeout=5.0,
                                                    remote_shared_memory=shared), f"nencache-bench-latency-{label[:6]}")
        closers.append(tier.close)
        tier.put(blobs)
        probes[label] = lambda tier=tier: _timed(lambda: tier.get([disk_key]))
    try:
        read_warm = probes["CPU memory tier (read_into)"]
        warm = [read_warm() for _ in range(ctx.scale.samples + 5)][5:]
        ctx.progress.step(f"{ctx.scale.samples} rounds over {len(probes)} tiers")
        for probe in probes.values():  # warm-up: connections, buffers, first-call costs
            for _ in range(5):
                probe()
        for _ in range(ctx.scale.samples):
            for label, probe in probes.items():
                samples.setdefault(label, []).append(probe())
    finally:
        for close in reversed(closers):
            close()
    rows = list(samples.items())
    samples = dict(rows[:1] + [("CPU memory tier, back to back (read_into)", warm)] + rows[1:])
    table = Table(["tier", "p50 us", "p99 us", "target"], [])
    p50s, p99s = Series("p50", [], []), Series("p99", [], [])
    for label, values in samples.items():
        p50, p99 = percentile(values, 0.5) * 1e6, percentile(values, 0.99) * 1e6
        goal = ""
        if label == "CPU memory tier (read_into)":
            goal = f"p50 < {CPU_TARGET_US:g} us"
            warm_p50 = percentile(warm, 0.5) * 1e6
            result.targets.append(TargetCheck("CPU tier access (8 KiB chunk)", goal,
                                              f"p50 {p50:.1f} us, p99 {p99:.1f} us (back to back: p50 {warm_p50:.1f} us)",
                                              p50 < CPU_TARGET_US, "judged on the interleaved reads (cold caches)"))
        elif label == "disk tier, from the device":
            goal = f"p50 < {disk_target:g} us ({disk_label})"
            result.targets.append(TargetCheck(f"{disk_label} tier access (8 KiB chunk)", goal,
                                              f"p50 {p50:.0f} us, p99 {p99:.0f} us", p50 < disk_target,
                                              f"{kind} under {where}"))
        table.rows.append([label, fmt(p50), fmt(p99), goal or "-"])
        result.figures[label] = {"p50_us": p50, "p99_us": p99, "samples_us": [v * 1e6 for v in values]}
        for series, value in ((p50s, p50), (p99s, p99)):
            series.x.append(label.replace(", ", "\n").replace(" (", "\n("))
            series.y.append(value)
    result.tables.append(table)
    result.notes.insert(0, f"{ctx.scale.samples} samples per tier, interleaved round by round; chunk: {TOKENS} tokens "
                           f"of a 2-layer, 1-KV-head, head-dim-64 bf16 model ({SMALL.nbytes(TOKENS)} bytes). "
                           f"Disk: {where}, {kind}.")
    result.plots.append(Plot("Single small-chunk access", "microseconds (log scale)", [p50s, p99s], log_y=True,
                             hlines=[(CPU_TARGET_US, "CPU target"), (disk_target, f"{disk_label} target")]))
    return result


STEPS = 2
