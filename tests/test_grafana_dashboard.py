"""docs/grafana/nencache.json: every metric it queries exists in the real exposition of a running
`nencache serve` or of a `KVCache`, and it has the panels docs/monitoring.md promises."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from nencache import CacheConfig, KVCache, KVLayout
from tests.server.util import ServerProcess

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "nencache.json"
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=16, dtype=torch.bfloat16)
METRIC = re.compile(r"\b(nencache_[a-z0-9_]+)\b")
PROMQL_WORDS = {"by", "sum", "rate", "increase", "histogram_quantile", "clamp_min", "label_values", "le"}


def panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        out.append(item)
        out += panels(item.get("panels", []))
    return out


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    return exprs


def exposed(text: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


@pytest.fixture
def expositions(tmp_path: Path) -> tuple[set[str], set[str]]:
    """Metric names of a real `nencache serve` (with a disk tier) and of a real `KVCache` using it, after traffic."""
    server = ServerProcess(tmp_path / "server", {"cpu_size": "16MiB", "server_max_chunk_bytes": "1MiB",
                                                 "disk_path": str(tmp_path / "server-disk")})
    (tmp_path / "server").mkdir()
    server.start()
    try:
        config = CacheConfig(chunk_size=16, cpu_size=LAYOUT.nbytes(16) * 4 + 256, disk_path=str(tmp_path / "disk"),
                             remote_url=server.url, metrics_port=0)
        with KVCache(config, LAYOUT, "dashboard-model") as cache:
            ids = list(range(160))
            cache.store(ids, torch.ones(LAYOUT.shape(160), dtype=LAYOUT.dtype))
            assert cache.flush(timeout=20)
            cache.lookup(ids)
            cache.retrieve(ids)
            engine = get(cache._metrics.url)
        served = get(f"http://127.0.0.1:{server.admin_port}/metrics")
    finally:
        server.kill()
    return exposed(served), exposed(engine)


def test_every_metric_the_dashboard_queries_is_exposed(expositions: tuple[set[str], set[str]]) -> None:
    served, engine = expositions
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for expr in queries(dashboard) for name in METRIC.findall(expr)} - PROMQL_WORDS
    assert len(used) >= 30
    missing = sorted(used - served - engine)
    assert not missing, f"the dashboard queries metrics nothing exposes: {missing}"
    assert any(n.startswith("nencache_server_") for n in used) and any(n.startswith("nencache_tier_") for n in used)


def test_the_dashboard_has_the_promised_panels_and_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in panels(dashboard["panels"]) if p["type"] != "row"]
    for wanted in ("Hit rate per tier", "Bytes per second per tier", "Load / save latency (p50, p99)",
                   "Load latency histogram", "Evictions per tier", "Corrupt chunks and errors", "Pool use",
                   "Server hit rate", "Server bytes per second", "Server request latency (p50, p99)",
                   "Server evictions", "Server errors", "Server pool and connections"):
        assert wanted in titles
    ids = [p["id"] for p in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "model", "server"]
