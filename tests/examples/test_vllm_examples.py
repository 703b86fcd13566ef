"""The vLLM examples, run where vLLM is installed (`make test` runs them in .venv-vllm)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.examples.test_examples import cached_counts, run

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm")


def test_vllm_offline_restart_loads_the_document_from_nencache(tmp_path: Path) -> None:
    out = run("vllm_offline.py", "--disk", str(tmp_path / "kv"), "--tokens", "600", timeout=1800)
    (first, prompt), (second, _) = cached_counts(out)
    assert first == 0 and second >= 512  # whole blocks of the document, loaded by the restarted engine
    assert second < prompt


def test_vllm_serve_reuses_the_first_turn_for_the_second(tmp_path: Path) -> None:
    out = run("vllm_serve.py", "--port", str(_free_port()), timeout=1800)
    turns = re.findall(r"turn (\d): (\d+) of (\d+) prompt tokens from the cache", out)
    assert [t[0] for t in turns] == ["1", "2"]
    assert int(turns[0][1]) == 0 and int(turns[1][1]) >= 1024


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
