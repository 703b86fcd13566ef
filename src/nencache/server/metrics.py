"""Server counters and latency histograms, and their Prometheus exposition.

Counting is plain Python, one thread at a time (the event loop of `nencache serve`; the peer endpoint's
connection threads take a lock), with no client library on the hot path; `prometheus_client` is only
imported when `/metrics` is scraped.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nencache.net.protocol import Code, Op

_OP_NAMES = {int(op): op.name.lower() for op in Op}
_CODE_NAMES = {int(code): code.name.lower() for code in Code}
BUCKETS = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(slots=True)
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float:
        """Upper bucket bound holding quantile `q` (an estimate for /stats)."""
        target, running = q * self.n, 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts):
            running += count
            if running >= target and count:
                return bound
        return 0.0


@dataclass(slots=True)
class ServerCounters:
    started: float = field(default_factory=time.time)
    connections: int = 0
    accepted: int = 0
    refused: int = 0
    disk_reads_skipped: int = 0  # requests answered from memory alone because the disk had fallen behind
    received_bytes: int = 0
    sent_bytes: int = 0
    requests: dict[str, int] = field(default_factory=lambda: {op.name.lower(): 0 for op in Op})
    errors: dict[str, int] = field(default_factory=lambda: {code.name.lower(): 0 for code in Code})
    latency: dict[str, Histogram] = field(default_factory=lambda: {op.name.lower(): Histogram() for op in Op})

    def request(self, op: int, started: float) -> None:
        name = _OP_NAMES[op]
        self.requests[name] += 1
        self.latency[name].observe(time.perf_counter() - started)

    def error(self, code: int) -> None:
        self.errors[_CODE_NAMES[code]] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "uptime_seconds": round(time.time() - self.started, 3), "connections": self.connections,
            "accepted": self.accepted, "refused": self.refused, "disk_reads_skipped": self.disk_reads_skipped,
            "received_bytes": self.received_bytes,
            "sent_bytes": self.sent_bytes, "requests": dict(self.requests),
            "errors": {k: v for k, v in self.errors.items() if v},
            "latency_ms": {op: {"count": h.n, "mean": round(1e3 * h.total / h.n, 4), "p50_le": 1e3 * h.quantile(0.5),
                                "p99_le": 1e3 * h.quantile(0.99)} for op, h in self.latency.items() if h.n},
        }


class Collector:
    """A prometheus_client collector over the server's counters and store stats (read at scrape time)."""

    def __init__(self, counters: ServerCounters, store_stats: Callable[[], dict[str, Any]]) -> None:
        self.counters, self.store_stats = counters, store_stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        c, store = self.counters, self.store_stats()
        memory = store["memory"]

        def counter(name: str, doc: str, value: float, labels: dict[str, float] | None = None,
                    label: str = "") -> CounterMetricFamily:
            family = CounterMetricFamily(f"nencache_server_{name}", doc, labels=[label] if labels else None)
            if labels:
                for key, amount in labels.items():
                    family.add_metric([key], amount)
            else:
                family.add_metric([], value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"nencache_server_{name}", doc, value=value)

        yield counter("requests", "Requests served, by op.", 0, c.requests, "op")
        yield counter("errors", "Error replies sent, by code.", 0, {k: float(v) for k, v in c.errors.items()}, "code")
        yield counter("hits", "Keys found in memory by GET.", memory["hits"])
        yield counter("misses", "Keys not in memory asked by GET.", memory["misses"])
        yield counter("received_bytes", "Bytes read from clients.", c.received_bytes)
        yield counter("sent_bytes", "Bytes written to clients.", c.sent_bytes)
        yield counter("stored_chunks", "Chunks stored in memory.", memory["stored_chunks"])
        yield counter("evictions", "Chunks evicted from memory.", memory["evicted_chunks"])
        yield counter("evicted_bytes", "Bytes evicted from memory.", memory["evicted_bytes"])
        yield counter("connections_accepted", "Connections accepted.", c.accepted)
        yield counter("connections_refused", "Connections refused (server_max_connections).", c.refused)
        yield counter("disk_reads_skipped", "Requests answered from memory alone: the disk had fallen behind.",
                      c.disk_reads_skipped)
        yield gauge("connections", "Open client connections.", c.connections)
        yield gauge("pool_capacity_bytes", "Memory pool size.", store["pool"]["capacity_bytes"])
        yield gauge("pool_used_bytes", "Bytes of chunks held in the memory pool.", memory["bytes_used"])
        yield gauge("pool_free_pages", "Free pool pages.", store["pool"]["free_pages"])
        yield gauge("chunks", "Chunks held in memory.", memory["chunks"])
        yield gauge("namespaces", "Namespaces open.", store["namespaces"])
        if "disk" in store:
            disk = store["disk"]
            yield counter("disk_hits", "Chunks read from the disk tier.", disk["hits"])
            yield counter("disk_misses", "Keys not found on the disk tier.", disk["misses"])
            writer_errors = store.get("disk_writer", {}).get("errors", 0)
            yield counter("disk_errors", "Disk tier errors.", disk["errors"] + writer_errors)
            yield counter("disk_dropped", "Chunks the disk tier did not take (disk full).", disk["dropped"])
            yield counter("disk_writes_dropped", "Disk writes given up because the pool was full of pending ones.",
                          store.get("disk_writer", {}).get("dropped", 0))
            yield gauge("disk_used_bytes", "Bytes on the disk tier.", disk["bytes_used"])
        histogram = HistogramMetricFamily("nencache_server_request_seconds", "Request latency, by op.", labels=["op"])
        for op, h in c.latency.items():
            histogram.add_metric([op], h.cumulative(), h.total)
        yield histogram
