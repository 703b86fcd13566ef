"""`disk`: KV tokens per second to and from disk, by disk codec, against LMCache's raw disk backend.

On raw bytes both NenCache and LMCache write at 0.8-0.9 of what `dd` does (see the `tiers` suite), so the way
to move KV 2-3x faster than LMCache is to move fewer bytes. Each rep stores fresh SmolLM2-135M KV (normal
values) through a `KVCache` with the CPU tier off (`local_cpu: false`) and the disk tier in the user's
`disk_path` (else /var/tmp), `store` + `flush` (durable), then reads it back with the page cache dropped
(`retrieve` into engine KV), for `disk_codec` raw, int8 (at the model's noise floor), int4 and zstd+int4 (how
much each lossy codec changes the model's output: `benchmarks/codecs.py`); LMCache's local disk backend (raw,
CPU tier off, store timed until its files are written and fsynced, cold retrieve) takes its rep in turn.
Target: 2-3x LMCache's tokens per second.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from nencache.bench.context import SMOLLM2, BenchContext, drop_page_cache, scratch_cleanup
from nencache.bench.kv import smooth_kv, token_ids
from nencache.bench.results import Plot, Series, SuiteResult, Summary, Table, TargetCheck, fmt, paired
from nencache.cache import KVCache
from nencache.config import CacheConfig

CHUNK = 256
CODECS = ("raw", "int8", "int4", "zstd+int4")
TARGET = 2.0  # the low end of the stated 2-3x
PROBE = Path(__file__).resolve().parent.parent / "lmcache_probe.py"


class _LMCacheDisk:
    """LMCache's disk side in its own process, one rep per request (`lmcache_probe.py disk`)."""

    def __init__(self, python: Path, tokens: int, directory: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
        self.proc = subprocess.Popen(
            [str(python), str(PROBE), "disk", "--layers", str(SMOLLM2.num_layers), "--kv-heads",
             str(SMOLLM2.num_kv_heads), "--head-dim", str(SMOLLM2.head_dim), "--tokens", str(tokens), "--dir",
             str(directory), "--torch-threads", str(torch.get_num_threads())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.version = self._read().get("lmcache_version")
        self._read()  # {"ready": true}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the LMCache process exited with status {self.proc.wait()}")
        data: dict[str, Any] = json.loads(line)
        if "error" in data:
            raise RuntimeError(f"LMCache: {data['error']}")
        return data

    def rep(self) -> tuple[float, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("rep\n")
        self.proc.stdin.flush()
        data = self._read()
        return data["store_s"], data["retrieve_s"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _rep(cache: KVCache, tokens: int, gen: torch.Generator, directory: Path, pause: float) -> tuple[float, float]:
    """Seconds of a durable store and of a cold retrieve of `tokens` fresh tokens."""
    ids, kv = token_ids(tokens, gen), smooth_kv(SMOLLM2, tokens, gen)
    out = torch.zeros_like(kv)
    time.sleep(pause)
    started = time.perf_counter()
    cache.store(ids, kv)
    if not cache.flush():
        raise RuntimeError("the disk tier did not take every chunk (see stats: write_dropped, write_failed_chunks)")
    store_s = time.perf_counter() - started
    drop_page_cache(directory)
    time.sleep(pause)
    started = time.perf_counter()
    got = cache.retrieve_prefix(ids, out=out)
    retrieve_s = time.perf_counter() - started
    if got != tokens:
        raise RuntimeError(f"read back {got} of {tokens} tokens from disk")
    if cache.config.tiers.disk.codec == "raw" and not torch.equal(out.view(torch.int16), kv.view(torch.int16)):
        raise RuntimeError("raw KV read back from disk differs")
    cache.invalidate(ids)
    return store_s, retrieve_s


def run(ctx: BenchContext) -> SuiteResult:
    result = SuiteResult("disk", "KV tokens per second to and from disk, by codec")
    chunks = ctx.scale.chunks
    tokens = chunks * CHUNK
    nbytes = SMOLLM2.nbytes(tokens)
    work, where = ctx.disk_dir()
    pause = 0.0 if ctx.quick else 0.5
    caches: dict[str, KVCache] = {}
    lmcache: _LMCacheDisk | None = None
    version: str | None = None
    times: dict[str, list[tuple[float, float]]] = {}
    try:
        for codec in CODECS:
            directory = work / codec.replace("+", "-")
            config = CacheConfig(chunk_size=CHUNK, local_cpu=False, cpu_size=int(2.2 * nbytes) + SMOLLM2.nbytes(CHUNK),
                                 disk_path=str(directory), disk_size=8 * nbytes, disk_codec=codec,
                                 io_threads=ctx.config.tiers.io_threads, pin_memory=ctx.config.tiers.cpu.pin_memory)
            caches[codec] = KVCache(config, SMOLLM2, "nencache-bench-disk")
            caches[codec]._prefault.join()  # the pool is mapped at start-up, long before requests come
        if ctx.compare_lmcache and ctx.lmcache_python is not None:
            ctx.progress.step("starting LMCache's side")
            try:
                lmcache = _LMCacheDisk(ctx.lmcache_python, tokens, work)
                version = lmcache.version
            except Exception as exc:
                result.notes.append(f"LMCache: could not start ({exc}); its column is empty")
        gen = torch.Generator().manual_seed(5)
        for codec, cache in caches.items():  # warm-up: threads, buffers, codec tables
            _rep(cache, min(tokens, 2 * CHUNK), gen, work, 0.0)
        for rep in range(ctx.scale.reps):
            ctx.progress.step(f"rep {rep + 1} of {ctx.scale.reps}")
            for codec, cache in caches.items():
                times.setdefault(codec, []).append(_rep(cache, tokens, gen, work, pause))
            if lmcache is not None:
                time.sleep(pause)
                try:
                    times.setdefault("LMCache raw", []).append(lmcache.rep())
                except Exception as exc:
                    result.notes.append(f"LMCache: failed ({exc}); its column is empty")
                    lmcache.close()
                    lmcache, times["LMCache raw"] = None, []
        stored = {codec: cache.stats()["tiers"]["disk"]["stored_bytes"] for codec, cache in caches.items()}
    finally:
        for cache in caches.values():
            cache.close()
        if lmcache is not None:
            lmcache.close()
        scratch_cleanup(work)
    theirs = times.get("LMCache raw") or []
    table = Table(["disk codec", "bytes on disk vs raw", "store tokens/s", "retrieve tokens/s",
                   "store vs LMCache", "retrieve vs LMCache"], [])
    store_series, retrieve_series = Series("store", [], []), Series("retrieve", [], [])
    ratios: dict[str, tuple[float, float]] = {}
    for name, reps in times.items():
        if not reps:
            continue
        store = [tokens / s for s, _ in reps]
        retrieve = [tokens / r for _, r in reps]
        on_disk = f"{stored[name] / stored['raw']:.2f}" if name in stored else "1 (raw)"
        vs_store = vs_retrieve = "-"
        if theirs and name != "LMCache raw":
            s_ratio = paired(store, [tokens / s for s, _ in theirs])
            r_ratio = paired(retrieve, [tokens / r for _, r in theirs])
            ratios[name] = (s_ratio.median, r_ratio.median)
            vs_store, vs_retrieve = s_ratio.cell(3) + "x", r_ratio.cell(3) + "x"
        table.rows.append([name, on_disk, fmt(Summary.of(store).median), fmt(Summary.of(retrieve).median), vs_store,
                           vs_retrieve])
        result.figures[name] = {"store_tokens_per_s": store, "retrieve_tokens_per_s": retrieve,
                                "store_gbps": [v * SMOLLM2.bytes_per_token / 1e9 for v in store],
                                "retrieve_gbps": [v * SMOLLM2.bytes_per_token / 1e9 for v in retrieve]}
        store_series.x.append(name)
        store_series.y.append(Summary.of(store).median)
        retrieve_series.x.append(name)
        retrieve_series.y.append(Summary.of(retrieve).median)
    result.tables.append(table)
    goal = f">= {TARGET:g}x LMCache's raw tokens/s (stated: 2-3x), store and retrieve"
    if ratios:
        parts = [f"{codec}: store {s:.2f}x, retrieve {r:.2f}x" for codec, (s, r) in ratios.items()]
        met = any(s >= TARGET and r >= TARGET for codec, (s, r) in ratios.items() if codec != "raw")
        result.targets.append(TargetCheck("Disk I/O against LMCache", goal, "; ".join(parts), met,
                                          f"LMCache {version} local disk backend, raw; {tokens} tokens per rep"))
    else:
        result.targets.append(TargetCheck("Disk I/O against LMCache", goal,
                                          "LMCache not installed here (--compare lmcache)", None))
    result.notes.append(f"{tokens} tokens ({nbytes / 1e6:.0f} MB of bf16 KV) per rep, {ctx.scale.reps} reps, codecs and "
                        f"LMCache in turn within each rep; medians, ratios the median (range) of per-rep ratios. Disk: "
                        f"{where}. Store = store + flush (every chunk durable); retrieve = cold (page cache dropped).")
    result.plots.append(Plot("KV tokens per second, disk", "tokens/s", [store_series, retrieve_series]))
    return result


STEPS = 8
