"""NenCache's figures in vLLM's own metrics: connector stats (logged) and Prometheus (`/metrics`). Imports vLLM.

The scheduler side reports lookups; each worker reports its loads and saves. vLLM gathers the
`NenCacheStats` of every worker and the scheduler each step, logs their sum, and hands them to
`NenCachePromMetrics`, which exposes them on the server's `/metrics` as `vllm:nencache_*`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

COUNTERS: dict[str, str] = {
    "lookups": "Prompts NenCache was asked about.",
    "query_tokens": "Tokens of the prompts NenCache was asked about.",
    "hit_tokens": "Tokens of those prompts NenCache held.",
    "external_tokens": "Tokens NenCache offered beyond the engine's own prefix cache.",
    "loaded_tokens": "Tokens loaded from NenCache into the engine's KV cache.",
    "stored_tokens": "Tokens stored into NenCache from the engine's KV cache.",
    "failed_blocks": "Blocks whose load failed (the engine recomputes or fails them).",
}
TIMINGS: dict[str, str] = {
    "load_seconds": "Time to load one request's cached KV into the engine, in seconds.",
    "save_seconds": "Time to store one request's KV from the engine, in seconds.",
}
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class NenCacheStats(KVConnectorStats):
    """Counters summed over workers and steps, plus the individual load and save times."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {"counters": {}, "timings": {}}

    def add(self, name: str, value: int | float) -> None:
        if value:
            counters = self.data["counters"]
            counters[name] = counters.get(name, 0) + value

    def observe(self, name: str, values: list[float]) -> None:
        if values:
            self.data["timings"].setdefault(name, []).extend(values)

    def aggregate(self, other: KVConnectorStats) -> "NenCacheStats":
        for name, value in other.data.get("counters", {}).items():
            self.add(name, value)
        for name, values in other.data.get("timings", {}).items():
            self.observe(name, list(values))
        return self

    def reduce(self) -> dict[str, int | float]:
        summary: dict[str, int | float] = dict(self.data["counters"])
        for name, values in self.data["timings"].items():
            summary[f"{name}_count"] = len(values)
            summary[f"{name}_mean"] = round(sum(values) / len(values), 6)
        return summary

    def is_empty(self) -> bool:
        return not self.data.get("counters") and not self.data.get("timings")


class NenCachePromMetrics(KVConnectorPromMetrics):
    """`vllm:nencache_*` counters and histograms, one series per engine."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._counter_cls(name=f"vllm:nencache_{name}", documentation=doc, labelnames=labelnames)
            for name, doc in COUNTERS.items()
        }
        self._timings = {
            name: self._histogram_cls(name=f"vllm:nencache_{name}", documentation=doc, labelnames=labelnames,
                                      buckets=list(_BUCKETS))
            for name, doc in TIMINGS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, value in transfer_stats_data.get("counters", {}).items():
            if name in self._counters:
                self._counters[name].labels(*labels).inc(value)
        for name, values in transfer_stats_data.get("timings", {}).items():
            if name in self._timings:
                series = self._timings[name].labels(*labels)
                for value in values:
                    series.observe(value)
