"""`tiers`: store and retrieve throughput of each tier, as a share of what this machine allows for it.

Every tier moves SmolLM2-135M-shaped chunks (256 tokens, 5.9 MB) and is compared, rep by rep, with
its reference measured in the same rep:
- CPU memory tier: `KVCache` store / retrieve (memory only) against a `copy_` of the same bytes;
- disk: `DiskTier` put + flush (durable) / get after the page cache is dropped, against `dd` with
  direct I/O, in the user's `disk_path` (else /var/tmp);
- Redis: `RedisTier` put / get of 16 chunks (pipelined) against `redis-benchmark` SET / GET;
- NenCache server: `ServerTier` put / get of 16 chunks against a raw socket moving the same bytes to
  and from a child process; also the get through the server's shared pool (same machine only).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from nencache.bench.context import SMOLLM2, BenchContext, drop_page_cache, scratch_cleanup
from nencache.bench.kv import chunk_blobs, random_kv, token_ids
from nencache.bench.references import RawSocket, dd_available, dd_read, dd_write, memcpy_seconds, redis_benchmark
from nencache.bench.results import Plot, Series, SuiteResult, Summary, Table, fmt, paired
from nencache.cache import KVCache
from nencache.config import CacheConfig
from nencache.tiers.base import Tier

CHUNK = 256
BATCH = 16  # chunks per put / get on the network tiers


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


class _Rows:
    """Rows of (tier, operation): GB/s of NenCache and of the reference, per rep."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], dict[str, list[float]]] = {}
        self.references: dict[tuple[str, str], str] = {}

    def add(self, tier: str, op: str, ours: float, theirs: float | None, reference: str) -> None:
        row = self.data.setdefault((tier, op), {"ours": [], "theirs": []})
        row["ours"].append(ours)
        if theirs is not None:
            row["theirs"].append(theirs)
        self.references[(tier, op)] = reference


def _cpu(ctx: BenchContext, rows: _Rows) -> None:
    layout, chunks = SMOLLM2, ctx.scale.chunks
    tokens = chunks * CHUNK
    nbytes = layout.nbytes(tokens)
    gen = torch.Generator().manual_seed(1)
    kv, ids = random_kv(layout, tokens, gen), token_ids(tokens, gen)
    out, target = torch.empty_like(kv), torch.empty_like(kv)
    config = CacheConfig(chunk_size=CHUNK, cpu_size=int(nbytes * 1.05) + layout.nbytes(CHUNK),
                         pin_memory=ctx.config.tiers.cpu.pin_memory)
    with KVCache(config, layout, "nencache-bench-tiers") as cache:
        cache.store(ids, kv)  # every page touched once: the pool is static, as a long-running one is
        cache.retrieve(ids, out=out)
        memcpy_seconds(kv, target)
        for _ in range(ctx.scale.reps):
            copy = memcpy_seconds(kv, target)
            cache.invalidate()
            store = _timed(lambda: cache.store(ids, kv))
            out.zero_()
            retrieve = _timed(lambda: cache.retrieve(ids, out=out))
            if not torch.equal(out.view(torch.int16), kv.view(torch.int16)):
                raise RuntimeError("the memory tier returned different KV bytes")
            rows.add("CPU memory", "store", nbytes / store / 1e9, nbytes / copy / 1e9, "memcpy (copy_)")
            rows.add("CPU memory", "retrieve", nbytes / retrieve / 1e9, nbytes / copy / 1e9, "memcpy (copy_)")


def _disk(ctx: BenchContext, rows: _Rows, notes: list[str]) -> None:
    from nencache.tiers.disk.tier import DiskTier
    from nencache.tiers.disk.io import round_up

    work, where = ctx.disk_dir()
    try:
        blobs = chunk_blobs(SMOLLM2, CHUNK, ctx.scale.chunks)
        size = len(blobs[0][1])
        total, block = size * len(blobs), round_up(size)
        keys = [k for k, _ in blobs]
        pause = 0.0 if ctx.quick else 0.5  # virtual disks serve bursts faster: each side starts from idle
        cold = True
        for rep in range(ctx.scale.reps):
            tier = DiskTier(work, f"{rep:04x}", 4 * total, io_threads=ctx.config.tiers.io_threads)
            ddfile = work / "dd.bin"
            try:
                def write() -> None:
                    for i in range(0, len(blobs), BATCH):
                        tier.put(blobs[i : i + BATCH])
                    tier.flush()

                def read() -> None:
                    for i in range(0, len(keys), 8):
                        got = tier.get(keys[i : i + 8])
                        if any(g is None or len(g) != size for g in got):
                            raise RuntimeError("the disk tier returned a chunk missing or short")

                time.sleep(pause)
                theirs_w = dd_write(ddfile, block, len(blobs)) if dd_available() else None
                time.sleep(pause)
                ours_w = _timed(write)
                cold = drop_page_cache() and cold
                time.sleep(pause)
                theirs_r = dd_read(ddfile, block) if dd_available() else None
                cold = drop_page_cache() and cold
                time.sleep(pause)
                ours_r = _timed(read)
                rows.add("disk", "store (put + flush, durable)", total / ours_w / 1e9,
                         None if theirs_w is None else len(blobs) * block / theirs_w / 1e9, "dd oflag=direct conv=fsync")
                rows.add("disk", "retrieve (cold get)", total / ours_r / 1e9,
                         None if theirs_r is None else len(blobs) * block / theirs_r / 1e9, "dd iflag=direct")
                tier.clear()
            finally:
                tier.close()
                ddfile.unlink(missing_ok=True)
        notes.append(f"disk: {where}; page cache dropped before reads: "
                     f"{'yes' if cold else 'no (not root: reads rely on O_DIRECT)'}")
    finally:
        scratch_cleanup(work)


def _network_tier(ctx: BenchContext, url: str, *, shared_memory: bool = True) -> Tier:
    from nencache.assemble import remote_tier

    config = ctx.config.replace(remote_url=url, remote_timeout=30.0, remote_shared_memory=shared_memory)
    return remote_tier(config, "nencache-bench-tiers")


def _redis(ctx: BenchContext, rows: _Rows, notes: list[str]) -> None:
    from urllib.parse import urlsplit

    service = ctx.services.redis()
    if service is None:
        notes.append("Redis: not measured (no remote_url redis:// in the config and no redis-server installed)")
        return
    tier = _network_tier(ctx, service.url)
    blobs = chunk_blobs(SMOLLM2, CHUNK, BATCH)
    keys = [k for k, _ in blobs]
    size = len(blobs[0][1])
    total = size * len(blobs)
    parts = urlsplit(service.url)
    try:
        tier.put(blobs)
        tier.get(keys)
        for _ in range(ctx.scale.reps):
            put = _timed(lambda: tier.put(blobs))
            got: list[object] = []
            get = _timed(lambda: got.extend(tier.get(keys)))
            if any(g is None for g in got):
                raise RuntimeError("the Redis tier lost a chunk")
            reference = (redis_benchmark(parts.hostname or "127.0.0.1", parts.port or 6379, size,
                                         total_bytes=(64 if ctx.quick else 256) << 20)
                         if parts.scheme in ("redis", "valkey") else None)
            rows.add("Redis", f"put ({BATCH} chunks, pipelined)", total / put / 1e9,
                     reference["SET"] if reference else None, "redis-benchmark SET")
            rows.add("Redis", f"get ({BATCH} chunks, pipelined)", total / get / 1e9,
                     reference["GET"] if reference else None, "redis-benchmark GET")
        tier.delete(keys)
    finally:
        tier.close()
    notes.append(f"Redis: {service.describe()}")


def _server(ctx: BenchContext, rows: _Rows, notes: list[str]) -> None:
    service = ctx.services.server()
    if service is None:
        return
    socket_tier = _network_tier(ctx, service.url, shared_memory=False)
    shared_tier = _network_tier(ctx, service.url, shared_memory=True)
    blobs = chunk_blobs(SMOLLM2, CHUNK, BATCH)
    keys = [k for k, _ in blobs]
    total = len(blobs[0][1]) * len(blobs)
    try:
        with RawSocket(total) as raw:
            socket_tier.put(blobs)
            shared_tier.get(keys)
            raw.fetch()
            raw.send()
            for _ in range(ctx.scale.reps):
                raw_send, raw_fetch = raw.send(), raw.fetch()
                put = _timed(lambda: socket_tier.put(blobs))
                got: list[object] = []
                get = _timed(lambda: got.extend(socket_tier.get(keys)))
                shared: list[object] = []
                get_shared = _timed(lambda: shared.extend(shared_tier.get(keys)))
                if any(g is None for g in got + shared):
                    raise RuntimeError("the server tier lost a chunk")
                rows.add("server", f"put ({BATCH} chunks, pipelined)", total / put / 1e9, total / raw_send / 1e9,
                         "raw socket")
                rows.add("server", f"get ({BATCH} chunks, pipelined)", total / get / 1e9, total / raw_fetch / 1e9,
                         "raw socket")
                rows.add("server", "get from its shared pool (same machine)", total / get_shared / 1e9,
                         total / raw_fetch / 1e9, "raw socket")
            shared_reads = getattr(shared_tier, "shared_reads", 0)
    finally:
        socket_tier.close()
        shared_tier.close()
    notes.append(f"server: {service.describe()}; chunks copied out of its shared pool: {shared_reads}")


def run(ctx: BenchContext) -> SuiteResult:
    result = SuiteResult("tiers", "Tier throughput against this machine's limits")
    rows = _Rows()
    for label, part in (("CPU memory tier vs memcpy", lambda: _cpu(ctx, rows)),
                        ("disk tier vs dd (direct I/O)", lambda: _disk(ctx, rows, result.notes)),
                        ("Redis tier vs redis-benchmark", lambda: _redis(ctx, rows, result.notes)),
                        ("server tier vs a raw socket", lambda: _server(ctx, rows, result.notes))):
        ctx.progress.step(label)
        try:
            part()
        except Exception as exc:  # one tier failing must not lose the others' figures
            result.notes.append(f"{label}: failed ({exc!r})")
    table = Table(["tier", "operation", "NenCache GB/s", "reference", "reference GB/s", "NenCache / reference"], [])
    ours_series, ref_series = Series("NenCache", [], []), Series("reference", [], [])
    for (tier, op), data in rows.data.items():
        ours = Summary.of(data["ours"])
        theirs = Summary.of(data["theirs"]) if data["theirs"] else None
        ratio = paired(data["ours"], data["theirs"]) if data["theirs"] else None
        table.rows.append([tier, op, fmt(ours.median), rows.references[(tier, op)],
                           fmt(theirs.median) if theirs else "-", ratio.cell(2) if ratio else "-"])
        result.figures[f"{tier}: {op}"] = {"gbps": data["ours"], "reference": rows.references[(tier, op)],
                                           "reference_gbps": data["theirs"],
                                           "ratio_median": ratio.median if ratio else None}
        ours_series.x.append(f"{tier}\n{op.split(' (')[0]}")
        ours_series.y.append(ours.median)
        ref_series.x.append(ours_series.x[-1])
        ref_series.y.append(theirs.median if theirs else None)
    result.tables.append(table)
    result.notes.insert(0, f"{ctx.scale.reps} reps; each rep measures NenCache and its reference side by side; "
                           "GB/s = 1e9 bytes/s, medians; ratios are the median (range) of per-rep ratios. Chunks: "
                           "256 tokens of SmolLM2-135M KV (30 layers x 3 KV heads x 64, bf16: 5.9 MB). "
                           f"torch threads: {torch.get_num_threads()}.")
    result.plots.append(Plot("Throughput per tier", "GB/s", [ours_series, ref_series]))
    return result


STEPS = 4
