"""A `KVCache`'s Prometheus metrics: the counters of `stats()` per tier, pool use, load/save latency.

The cache records the latency of its loads (`retrieve`, `retrieve_prefix`) and saves (`store`,
`store_layers`) in `CallLatency` histograms: plain Python under a lock, no client library on the hot
path. `prometheus_client` is imported only when metrics are exposed, either

- on their own HTTP port (`metrics_port` in the config; one server per port, shared by every cache of
  the process, each cache's series labelled with its `model` and `namespace`), or
- in a registry the engine already serves (`register(cache, registry)`), e.g. vLLM's.

Metric names and what they mean are listed in docs/monitoring.md; the Grafana dashboard
(docs/grafana/nencache.json) reads them beside those of `nencache serve` (`nencache_server_*`).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

# Upper bounds in seconds: 10 us (a pool hit) to 10 s (a large load from a slow remote tier).
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
TIER_COUNTERS = {  # TierStats field -> (metric suffix, help)
    "hits": ("hits", "Chunks found in the tier."),
    "misses": ("misses", "Chunks asked of the tier and not found."),
    "read_bytes": ("read_bytes", "Bytes read from the tier."),
    "stored_chunks": ("stored_chunks", "Chunks written to the tier."),
    "stored_bytes": ("stored_bytes", "Bytes written to the tier."),
    "evicted_chunks": ("evicted_chunks", "Chunks the tier evicted to make room."),
    "evicted_bytes": ("evicted_bytes", "Bytes the tier evicted."),
    "errors": ("errors", "Failed calls to the tier (each was served as a miss)."),
    "corrupt": ("corrupt", "Chunks that came back from the tier failing their checksum (dropped, served as misses)."),
    "dropped": ("dropped", "Chunks the tier did not take (full, too large)."),
    "read_seconds": ("read_seconds", "Seconds spent reading from the tier."),
    "write_seconds": ("write_seconds", "Seconds spent writing to the tier."),
}
TIER_GAUGES = {
    "chunks": ("chunks", "Chunks held by the tier."),
    "bytes_used": ("used_bytes", "Bytes held by the tier."),
    "capacity_bytes": ("capacity_bytes", "Size bound of the tier (0: unbounded or unknown)."),
}
CACHE_COUNTERS = {  # KVCache.stats() key -> help
    "lookups": "Lookups (requests asking for their cached prefix).",
    "lookup_tokens": "Tokens looked up.",
    "hit_tokens": "Tokens found cached by lookups.",
    "stored_chunks": "Chunks stored into the pool.",
    "stored_bytes": "KV bytes stored into the pool.",
    "store_skipped_chunks": "Chunks a store could not put into the pool (pinned by readers and writes).",
    "retrieved_tokens": "Tokens retrieved into engine KV.",
    "retrieved_bytes": "KV bytes retrieved into engine KV.",
    "written_chunks": "Chunks written to the tiers below memory.",
    "write_dropped": "Pending writes given up under back-pressure.",
    "write_failed_chunks": "Chunks a tier below memory did not take.",
    "tier_errors": "Failed calls to any tier below memory (per tier: nencache_tier_errors).",
}
LOOKUP_STATS = {  # KVCache.stats()["p2p"] key -> (metric, kind, help), with enable_p2p
    "found_directory": ("nencache_p2p_found_directory_keys", "counter",
                        "Chunk keys whose holder was found in a local peer's shared-pool directory."),
    "found_mirror": ("nencache_p2p_found_mirror_keys", "counter",
                     "Chunk keys whose holders were found in the local mirror of the P2P index."),
    "asked_index": ("nencache_p2p_asked_index_keys", "counter",
                    "Chunk keys looked up in the P2P index in Redis (one round trip per lookup)."),
    "mirror_live": ("nencache_p2p_mirror_live", "gauge",
                    "1 while the mirror of the P2P index is subscribed to the peers' announcements."),
    "mirror_keys": ("nencache_p2p_mirror_keys", "gauge", "Chunk keys the mirror of the P2P index lists."),
    "mirror_malformed": ("nencache_p2p_mirror_malformed", "counter",
                         "Messages on the announcement channel that were not announcements (ignored)."),
    "mirror_dropped": ("nencache_p2p_mirror_dropped_keys", "counter",
                       "Announced keys the mirror did not copy because it was full (p2p_mirror_keys)."),
    "announce_failures": ("nencache_p2p_announce_failures", "counter",
                          "Announcements Redis refused (no pub/sub allowed); peers then ask the index."),
}
_RENAMED = {"tier_errors": "lower_tier_errors"}  # a cache-wide count, apart from the per-tier family


@dataclass(slots=True)
class LatencyHistogram:
    """Counts of observed seconds per bucket of `LATENCY_BUCKETS` (the last one is +Inf)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative (upper bound, count) pairs and the sum, as Prometheus wants them."""
        running, buckets = 0, []
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts):
            running += count
            buckets.append((bound, running))
        return buckets, self.total


class CallLatency:
    """Latency histograms of a cache's calls, by operation (`load`, `save`). Thread-safe."""

    OPS = ("load", "save")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._histograms = {op: LatencyHistogram() for op in self.OPS}

    def observe(self, op: str, started: float) -> None:
        """Record a call of `op` that began at `started` (a `time.perf_counter()` value) and ends now."""
        seconds = time.perf_counter() - started
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            histogram = self._histograms[op]
            histogram.counts[index] += 1
            histogram.total += seconds

    def snapshot(self) -> dict[str, tuple[list[tuple[str, int]], float]]:
        with self._lock:
            return {op: h.snapshot() for op, h in self._histograms.items()}


class Observed(Protocol):
    """What the metrics read from a cache (`KVCache` has all of it)."""

    model_id: str
    namespace: bytes
    latency: CallLatency

    def stats(self) -> dict[str, Any]: ...


class CacheCollector:
    """A prometheus_client collector over caches, read at scrape time (see the module docstring)."""

    def __init__(self) -> None:
        self._caches: dict[int, Observed] = {}
        self._lock = threading.Lock()

    def add(self, cache: Observed) -> None:
        with self._lock:
            self._caches[id(cache)] = cache

    def remove(self, cache: Observed) -> bool:
        """Forget `cache`; True when no cache is left."""
        with self._lock:
            self._caches.pop(id(cache), None)
            return not self._caches

    def describe(self) -> list[Any]:
        return []  # families depend on the tiers present: described at collect time only

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            caches = list(self._caches.values())
        base = ["model", "namespace"]
        families: dict[str, Any] = {}

        def family(kind: Callable[..., Any], name: str, doc: str, labels: list[str]) -> Any:
            if name not in families:
                families[name] = kind(name, doc, labels=labels)
            return families[name]

        for cache in caches:
            try:
                stats = cache.stats()
            except Exception:  # a closed or failing cache contributes nothing to this scrape
                continue
            ident = [cache.model_id, cache.namespace.hex()[:16]]
            for key, doc in CACHE_COUNTERS.items():
                if key in stats:
                    name = f"nencache_{_RENAMED.get(key, key)}"
                    family(CounterMetricFamily, name, doc, base).add_metric(ident, stats[key])
            family(GaugeMetricFamily, "nencache_pool_capacity_bytes", "Size of the CPU memory pool.",
                   base).add_metric(ident, stats["pool_bytes"])
            family(GaugeMetricFamily, "nencache_pool_used_bytes", "Bytes of chunks held in the CPU memory pool.",
                   base).add_metric(ident, stats["pool_used_bytes"])
            family(GaugeMetricFamily, "nencache_write_pending", "Chunks waiting to be written below memory.",
                   base).add_metric(ident, stats.get("write_pending", 0))
            for tier, counts in stats["tiers"].items():
                for key, (suffix, doc) in TIER_COUNTERS.items():
                    family(CounterMetricFamily, f"nencache_tier_{suffix}", doc, [*base, "tier"]).add_metric(
                        [*ident, tier], counts.get(key, 0))
                for key, (suffix, doc) in TIER_GAUGES.items():
                    family(GaugeMetricFamily, f"nencache_tier_{suffix}", doc, [*base, "tier"]).add_metric(
                        [*ident, tier], counts.get(key, 0))
            for key, value in stats.get("p2p", {}).items():
                if key in LOOKUP_STATS:
                    name, kind, doc = LOOKUP_STATS[key]
                    family(CounterMetricFamily if kind == "counter" else GaugeMetricFamily, name, doc,
                           base).add_metric(ident, value)
            histogram = family(HistogramMetricFamily, "nencache_request_seconds",
                               "Latency of the cache's loads (retrieve) and saves (store).", [*base, "op"])
            for op, (buckets, total) in cache.latency.snapshot().items():
                histogram.add_metric([*ident, op], buckets, total)
        yield from families.values()


def register(cache: Observed, registry: Any) -> CacheCollector:
    """Expose `cache`'s metrics in an existing prometheus_client `registry` (an engine's own)."""
    collector = CacheCollector()
    collector.add(cache)
    registry.register(collector)
    return collector


@dataclass(slots=True)
class _Endpoint:
    server: Any
    thread: threading.Thread
    collector: CacheCollector
    port: int


_ENDPOINTS: dict[tuple[str, int], _Endpoint] = {}
_ENDPOINTS_LOCK = threading.Lock()


class MetricsHandle:
    """A cache's place on a metrics HTTP endpoint; `close()` takes it off (the last one stops the server)."""

    def __init__(self, key: tuple[str, int], cache: Observed, port: int) -> None:
        self._key, self._cache, self.port = key, cache, port
        self._closed = False

    @property
    def url(self) -> str:
        host = self._key[0]
        return f"http://{'127.0.0.1' if host in ('', '0.0.0.0') else host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _ENDPOINTS_LOCK:
            endpoint = _ENDPOINTS.get(self._key)
            if endpoint is None or not endpoint.collector.remove(self._cache):
                return
            del _ENDPOINTS[self._key]
        endpoint.server.shutdown()
        endpoint.server.server_close()
        endpoint.thread.join(5)


def serve_metrics(cache: Observed, host: str, port: int) -> MetricsHandle:
    """Serve `cache`'s metrics at http://host:port/metrics (port 0: any free one; the handle says which).

    Caches of one process asking for the same port share its server.
    """
    from nencache.errors import ConfigError

    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise ConfigError("metrics_port needs prometheus_client: pip install 'nencache[server]'") from None
    with _ENDPOINTS_LOCK:
        key = (host, port)
        endpoint = _ENDPOINTS.get(key) if port else None
        if endpoint is None:
            registry = CollectorRegistry(auto_describe=False)
            collector = CacheCollector()
            registry.register(collector)
            try:
                server, thread = start_http_server(port, addr=host, registry=registry)
            except OSError as exc:
                raise ConfigError(f"metrics_port {port} on {host}: {exc.strerror or exc}; choose a free port "
                                  "(0: any)") from None
            endpoint = _Endpoint(server, thread, collector, int(server.server_address[1]))
            key = (host, endpoint.port)
            _ENDPOINTS[key] = endpoint
        endpoint.collector.add(cache)
        return MetricsHandle(key, cache, endpoint.port)
