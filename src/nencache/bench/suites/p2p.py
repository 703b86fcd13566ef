"""`p2p`: fetch latency of one chunk from a peer, at 64 KiB, 1 MiB and 5.9 MB, beside a raw socket.

Peer A (`nencache.bench.p2p_peer`, its own process) holds one 256-token chunk of each size in a
`KVCache` with `enable_p2p`; the index is the config's `p2p_index_url` (else a throwaway Redis). Peer B
(this process) fetches it two ways:
- same machine: through A's shared pool (`p2p_shared_memory`: A's pool, mapped once, holds a directory
  of where each chunk A published sits, so the lookup asks neither the index nor A, and the fetch is
  one copy and a generation check);
- across machines: over the socket (`p2p_shared_memory: false`), as from another machine; loopback
  stands in for the network, so the raw socket beside it is the bound.
Per sample, in turn: the raw socket moving the same bytes (no framing, no index), then each way as
P2P fetch = lookup (`PeerTier.holders`: A's directory on the same machine; across machines, B's mirror
of the index, which B's caches subscribe to before A starts, as in a running fleet) + fetch from A with the peer tier's own checks (header,
length, key; the payload's CRC-32 for bytes that came over the socket) + check (what the store adds:
the header again, and the CRC-32 only for a tier that does not check it). Also `KVCache.retrieve_prefix`
of the chunk into engine KV (B's pool emptied first). Targets: same machine, 5.9 MB p50 < 1 ms; across
machines, p50 within 1.15x of the raw socket, and < 1 ms up to 1 MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from nencache.bench.context import BenchContext
from nencache.bench.p2p_peer import CHUNK, TOKENS
from nencache.bench.references import RawSocket
from nencache.bench.results import Plot, Series, SuiteResult, Table, TargetCheck, fmt, percentile
from nencache.cache import KVCache
from nencache.config import CacheConfig
from nencache.format import HEADER_SIZE, split_blob
from nencache.keys import chunk_keys
from nencache.layout import KVLayout

SIZES = {  # label -> (layers, KV heads, head dim): a 256-token bf16 chunk of that size
    "64 KiB": (1, 1, 64),
    "1 MiB": (8, 2, 64),
    "5.9 MB": (30, 3, 64),  # SmolLM2-135M
}
MODEL = "nencache-bench-p2p"
SAME_MACHINE_US = 1000.0
ACROSS_RATIO = 1.15
ACROSS_SMALL_US = 1000.0


def _start_peer(index_url: str, shared: bool) -> tuple[subprocess.Popen[str], list[str]]:
    spec = {"index_url": index_url, "model": MODEL, "layouts": list(SIZES.values()), "shared": shared}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NENCACHE_", "LMCACHE_"))}
    proc = subprocess.Popen([sys.executable, "-m", "nencache.bench.p2p_peer", json.dumps(spec)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the P2P peer process exited with status {proc.wait()}")
    return proc, json.loads(line)["addresses"]


class _Way:
    """B's side of one way of fetching one size: a `KVCache` and the P2P steps timed separately."""

    def __init__(self, layout: KVLayout, index_url: str, shared: bool) -> None:
        config = CacheConfig(chunk_size=CHUNK, cpu_size=4 * (layout.nbytes(CHUNK) + HEADER_SIZE), pin_memory=False,
                             enable_p2p=True, p2p_index_url=index_url, p2p_shared_memory=shared, remote_timeout=5.0)
        self.cache = KVCache(config, layout, MODEL)
        self.tier: Any = self.cache.peer
        [self.key] = chunk_keys(TOKENS, CHUNK, self.cache.namespace)
        self.out = torch.empty(layout.shape(CHUNK), dtype=layout.dtype)
        self.samples: dict[str, list[float]] = {"lookup": [], "fetch": [], "check": [], "total": [], "retrieve": []}

    def sample(self, keep: bool) -> None:
        t0 = time.perf_counter()
        [holders] = self.tier.holders([self.key])
        t1 = time.perf_counter()
        if not holders:
            raise RuntimeError("no holder of the peer's chunk was found")
        [blob] = self.tier.clients.get(holders[0].address, [self.key], [holders[0].placement])
        t2 = time.perf_counter()
        if blob is None:
            raise RuntimeError("the peer did not serve its chunk")
        split_blob(blob, self.key, verify=not self.tier.checks_payload)
        t3 = time.perf_counter()
        del blob
        self.cache.memory.clear()
        t4 = time.perf_counter()
        got = self.cache.retrieve_prefix(TOKENS, out=self.out)
        t5 = time.perf_counter()
        if got != CHUNK:
            raise RuntimeError("KVCache did not fetch the chunk from the peer")
        if keep:
            for name, seconds in (("lookup", t1 - t0), ("fetch", t2 - t1), ("check", t3 - t2), ("total", t3 - t0),
                                  ("retrieve", t5 - t4)):
                self.samples[name].append(seconds)

    def close(self) -> None:
        self.cache.close()


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `condition` came true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _us(values: list[float], q: float) -> float:
    return percentile(values, q) * 1e6


def run(ctx: BenchContext) -> SuiteResult:
    result = SuiteResult("p2p", "P2P fetch latency, same machine and across machines")
    index = ctx.config.p2p.index_url or (service.url if (service := ctx.services.redis()) else None)
    if index is None:
        result.skipped = "no p2p_index_url in the config and no redis-server installed to hold the index"
        return result
    ways: dict[tuple[str, str], _Way] = {}
    raws: dict[str, RawSocket] = {}
    raw_samples: dict[str, list[float]] = {label: [] for label in SIZES}
    closers: list[Callable[[], None]] = []
    proc: subprocess.Popen[str] | None = None
    try:
        for label, (layers, heads, dim) in SIZES.items():
            layout = KVLayout(layers, heads, dim, torch.bfloat16)
            for way, shared in (("same machine", True), ("across machines", False)):
                ways[(label, way)] = _Way(layout, index, shared)
                closers.append(ways[(label, way)].close)
            raws[label] = RawSocket(HEADER_SIZE + layout.nbytes(CHUNK))
            closers.append(raws[label].close)
        _wait(lambda: all(w.tier.mirror is None or w.tier.mirror.live for w in ways.values()))
        ctx.progress.step("starting the serving peer")
        proc, _ = _start_peer(index, shared=True)  # B's mirrors follow the index already, as in a running fleet
        mirrored = _wait(lambda: all(w.tier.mirror is not None and w.tier.mirror.lookup([w.key]) != [None]
                                     for w in ways.values()))
        samples, warmup = ctx.scale.samples, 10
        ctx.progress.step(f"{samples} fetches per size and way, interleaved with the raw socket")
        for rep in range(warmup + samples):
            for label in SIZES:
                seconds = raws[label].fetch()
                if rep >= warmup:
                    raw_samples[label].append(seconds)
                for way in ("same machine", "across machines"):
                    ways[(label, way)].sample(rep >= warmup)
        shared_reads = sum(w.tier.clients.shared_reads for (_, way), w in ways.items() if way == "same machine")
        socket_shared = sum(w.tier.clients.shared_reads for (_, way), w in ways.items() if way != "same machine")
        across_lookups = {name: sum(w.tier.lookup_stats()[name] for (_, way), w in ways.items()
                                    if way == "across machines") for name in ("found_mirror", "asked_index")}
    finally:
        for close in reversed(closers):
            close()
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(30)
    table = Table(["chunk", "way", "lookup p50 us", "fetch p50 us", "check p50 us", "P2P fetch p50 us",
                   "P2P fetch p99 us", "raw socket p50 us", "P2P / raw", "KVCache.retrieve p50 us"], [])
    series = {way: Series(f"P2P fetch, {way}", [], []) for way in ("same machine", "across machines")}
    raw_series = Series("raw socket", [], [])
    for label in SIZES:
        raw50 = _us(raw_samples[label], 0.5)
        raw_series.x.append(label)
        raw_series.y.append(raw50)
        for way in ("same machine", "across machines"):
            data = ways[(label, way)].samples
            total50 = _us(data["total"], 0.5)
            table.rows.append([label, way, fmt(_us(data["lookup"], 0.5)), fmt(_us(data["fetch"], 0.5)),
                               fmt(_us(data["check"], 0.5)), fmt(total50), fmt(_us(data["total"], 0.99)), fmt(raw50),
                               f"{total50 / raw50:.2f}", fmt(_us(data["retrieve"], 0.5))])
            result.figures[f"{label}, {way}"] = {
                **{f"{name}_p50_us": _us(v, 0.5) for name, v in data.items()},
                **{f"{name}_p99_us": _us(v, 0.99) for name, v in data.items()},
                "raw_socket_p50_us": raw50, "raw_socket_p99_us": _us(raw_samples[label], 0.99),
                "total_us": [v * 1e6 for v in data["total"]]}
            series[way].x.append(label)
            series[way].y.append(total50)
    result.tables.append(table)
    result.figures["chunks copied out of the peer's shared pool"] = {"same machine": shared_reads,
                                                                     "across machines": socket_shared}
    same = result.figures["5.9 MB, same machine"]
    result.targets.append(TargetCheck(
        "P2P, same machine (5.9 MB chunk)", f"p50 < {SAME_MACHINE_US:.0f} us",
        f"p50 {same['total_p50_us']:.0f} us (fetch {same['fetch_p50_us']:.0f} us), p99 {same['total_p99_us']:.0f} us",
        same["total_p50_us"] < SAME_MACHINE_US, "lookup in the holder's directory + fetch through the shared pool + check"))
    ratios = {label: result.figures[f"{label}, across machines"]["total_p50_us"] /
              result.figures[f"{label}, across machines"]["raw_socket_p50_us"] for label in SIZES}
    worst = max(ratios, key=lambda label: ratios[label])
    result.targets.append(TargetCheck(
        "P2P, across machines: against a raw socket", f"p50 within {ACROSS_RATIO}x of the raw socket",
        ", ".join(f"{label} {ratio:.2f}x" for label, ratio in ratios.items()), ratios[worst] <= ACROSS_RATIO,
        "lookup + fetch over the socket + check, against the same bytes through a raw loopback socket"))
    small = {label: result.figures[f"{label}, across machines"]["total_p50_us"] for label in ("64 KiB", "1 MiB")}
    result.targets.append(TargetCheck(
        "P2P, across machines: chunks up to 1 MiB", f"p50 < {ACROSS_SMALL_US:.0f} us",
        ", ".join(f"{label} {value:.0f} us" for label, value in small.items()),
        all(value < ACROSS_SMALL_US for value in small.values())))
    result.notes.append(f"{ctx.scale.samples} samples per size and way after 10 warm-up rounds; p50/p99 in "
                        f"microseconds. Index: {index}. Chunks copied out of the peer's shared pool: "
                        f"{shared_reads} (same machine), {socket_shared} (across machines, must be 0).")
    result.figures["lookups answered by the mirror of the index"] = mirrored
    result.figures["lookups, across machines (keys)"] = across_lookups
    result.notes.append("B's caches start first, so their mirrors of the index (`p2p_mirror_keys`, docs/p2p.md) "
                        "receive A's announcements: across machines the lookup is answered by the mirror, without a "
                        "round trip to Redis" if mirrored else "B's mirrors of the index did not list A's chunks "
                        "within 10 s: across machines, lookups were answered by the index")
    result.notes.append("Across machines is measured over loopback TCP with shared memory off: the protocol's and "
                        "the checks' costs beside the raw socket; a real network adds its own latency to both.")
    result.notes.append("Fetch includes the peer tier's own checks: header, length and key, and the payload's CRC-32 "
                        "for bytes that came over the socket; a copy out of a peer's shared pool is vouched for by "
                        "its page generation instead (docs/p2p.md). Check is what the store adds on top.")
    result.plots.append(Plot("P2P fetch p50", "microseconds (log scale)",
                             [series["same machine"], series["across machines"], raw_series], log_y=True,
                             hlines=[(SAME_MACHINE_US, "1 ms")]))
    return result


STEPS = 2
