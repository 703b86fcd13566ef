"""`nencache sim`: capacities as shares, sizes or counts; one JSON object with the figures asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nencache.cli import main
from nencache.errors import ConfigError
from nencache.policy.sim_command import capacity_chunks

from tests.policy.conftest import make_trace


def write_plain(path: Path) -> Path:
    lines = ["0 2048 0 1 2 3", "1 2048 0 1 2 3", "2 1024 0 4", "3 2048 0 1 2 3", "4 1500 0 4 5"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_json_has_the_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_plain(tmp_path / "t.txt")
    assert main(["sim", str(trace), "--cpu-capacity", "4 chunks", "--disk-capacity", "100%", "--policy", "learned",
                 "--prefetch", "learned", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("token_hit_rate", "cpu_hit_rate", "prefetch_waste_bytes", "decision_us", "disk_hit_rate",
                "prefill_seconds_saved", "bytes_disk_to_cpu", "bytes_cpu_to_disk"):
        assert key in data
    assert data["cpu_chunks"] == 4 and data["disk_chunks"] == 6 and 0 < data["token_hit_rate"] < 1


def test_the_table_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_plain(tmp_path / "t.txt")
    assert main(["sim", str(trace), "--cpu-capacity", "50%"]) == 0
    assert "token hit rate" in capsys.readouterr().out
    assert main(["sim", str(trace), "--policy", "fifo"]) == 2
    assert "eviction must be one of" in capsys.readouterr().err
    assert main(["sim", str(tmp_path / "none.txt")]) == 2
    assert "cannot read trace" in capsys.readouterr().err


def test_capacities() -> None:
    trace = make_trace([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]], block_tokens=512)
    assert capacity_chunks("50%", trace, 1 << 20, "x") == 5
    assert capacity_chunks("0.2", trace, 1 << 20, "x") == 2
    assert capacity_chunks("3MiB", trace, 1 << 20, "x") == 3
    assert capacity_chunks("7 chunks", trace, 1 << 20, "x") == 7
    with pytest.raises(ConfigError):
        capacity_chunks("150%", trace, 1 << 20, "x")
