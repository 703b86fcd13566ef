"""The report of a run: JSON with every figure, PNG plots, and an HTML page checked in a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nencache.bench.context import BenchContext
from nencache.bench.machine import describe
from nencache.bench.markdown import report_markdown
from nencache.bench.report import Report, write_report
from nencache.bench.results import SuiteResult
from nencache.bench.suites import latency, trace
from nencache.cli import main
from tests.redis_util import require_redis

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def chromium() -> str:
    """The Chromium binary; skip where it is not installed, except under CI (.ci/run installs it)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    message = "chromium is not installed (apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def report(bench_context: BenchContext, tmp_path: Path) -> tuple[Report, Path]:
    """A real run of two suites (tiny scale) and one that could not run, written to tmp_path/out."""
    require_redis()
    suites = [latency.run(bench_context), trace.run(bench_context),
              SuiteResult("memory", "Resident memory per cached token", skipped="no such service here")]
    run = Report(started="2026-01-01T00:00:00", command="nencache bench latency trace memory", quick=True,
                 machine=describe(tmp_path), config={"chunk_size": 256}, load_before=0.5, load_after=0.7,
                 notes=["a note for the reader"], suites=suites)
    out = io.StringIO()
    write_report(run, tmp_path / "out", out)
    printed = out.getvalue()
    assert "NenCache's targets" in printed and "CPU tier access (8 KiB chunk)" in printed
    return run, tmp_path / "out"


def test_json_holds_every_figure_target_and_the_machine(report: tuple[Report, Path]) -> None:
    run, out = report
    data = json.loads((out / "bench.json").read_text())
    assert data["machine"]["cores"] == os.cpu_count() and data["machine"]["disk"]["kind"]
    assert [s["name"] for s in data["suites"]] == ["latency", "trace", "memory"]
    assert data["suites"][0]["figures"]["CPU memory tier (read_into)"]["p50_us"] > 0
    assert {t["name"] for t in data["targets"]} == {t.name for _, t in run.targets}
    assert all(t["verdict"] in ("met", "not met", "not measured") for t in data["targets"])
    assert sorted(p.name for p in out.glob("*.png")) == ["latency.png", "trace.png"]
    markdown = report_markdown(data)
    assert markdown.startswith("| target | goal | measured | verdict | suite |")
    assert "### memory: Resident memory per cached token" in markdown and "Skipped: no such service here" in markdown


def test_the_html_page_renders_in_chromium_with_its_sections_and_plots(report: tuple[Report, Path],
                                                                       tmp_path: Path) -> None:
    browser = chromium()
    _, out = report
    page = (out / "report.html").as_uri()
    profile = tmp_path / "chromium-profile"
    shot = tmp_path / "report.png"
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    subprocess.run([*common, "--window-size=1280,2000", f"--screenshot={shot}", page], check=True,
                   capture_output=True, timeout=120)
    dom = subprocess.run([*common, "--dump-dom", page], check=True, capture_output=True, text=True,
                         timeout=120).stdout

    # The page as the browser built it: every section, the targets table, both plots decoded.
    for section in ("targets", "suite-latency", "suite-trace", "suite-memory"):
        assert f'id="{section}"' in dom, section
    assert re.search(r'data-plots-total="2"', dom) and re.search(r'data-plots-loaded="2"', dom), \
        "the browser did not decode both plots"
    assert "CPU tier access (8 KiB chunk)" in dom and "Skipped: no such service here" in dom
    assert dom.count('<table class="figures">') == 2

    # The screenshot is not blank: the header's dark band, the tables' text and the plots' colours are there.
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert image.shape == (2000, 1280, 3)
    not_white = float((image.sum(axis=2) < 720).mean())
    colours = len(np.unique(image.reshape(-1, 3) @ np.array([1 << 16, 1 << 8, 1])))
    assert not_white > 0.05, f"only {not_white:.1%} of the page is not white"
    assert colours > 100, f"only {colours} colours on the page"
    assert image[:60].mean() < 100, "the header band is missing"


def test_nencache_bench_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_redis()
    out = tmp_path / "run"
    assert main(["bench", "latency", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "latency: Single small-chunk access latency per tier" in printed and "report.html" in printed
    data = json.loads((out / "bench.json").read_text())
    assert data["command"] == f"nencache bench latency --quick --out {out}"
    assert data["quick"] is True and len(data["suites"][0]["figures"]["disk tier, from the device"]["samples_us"]) == 60
    assert (out / "report.html").stat().st_size > 10_000 and (out / "latency.png").exists()


def test_unknown_suites_and_comparisons_are_refused_before_anything_runs(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown suite 'nope'; choose from tiers, latency, p2p, memory, disk, ttft, trace" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["bench", "trace", "--trace", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "y")]) == 2
    assert "no such file" in capsys.readouterr().err
