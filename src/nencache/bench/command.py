"""What `nencache bench` does (the CLI only parses its arguments): run the suites, then write the report."""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from nencache.bench.context import BenchContext, Scale, find_lmcache
from nencache.bench.machine import describe, load_average
from nencache.bench.progress import Progress
from nencache.bench.report import Report, write_report
from nencache.bench.results import SuiteResult
from nencache.bench.services import Services
from nencache.bench.suites import SUITE_NAMES, suite
from nencache.config import CacheConfig
from nencache.errors import ConfigError

BUSY_LOAD_PER_CORE = 0.75  # above this 1-minute load per core, figures are noted as taken on a busy machine


@dataclass(slots=True)
class BenchArgs:
    """The `bench` subcommand's options, as parsed by the CLI."""

    suites: list[str] = field(default_factory=list)  # empty: all of them
    quick: bool = False
    out: str = "nencache-bench"
    compare: list[str] = field(default_factory=list)
    lmcache_python: str | None = None
    trace: str | None = None
    wait_idle: float = 0.0  # minutes to wait for the machine to go idle before measuring (0: do not wait)
    command: str = "nencache bench"  # as typed, for the report


def wait_until_idle(minutes: float, progress: Progress, cores: int) -> float | None:
    """Poll the load average every 10 s for up to `minutes` until it is below the busy level; the last value."""
    deadline = time.monotonic() + 60 * minutes
    load = load_average()
    while load is not None and load > BUSY_LOAD_PER_CORE * cores and time.monotonic() < deadline:
        progress.note(f"the machine is busy (load {load:.1f} on {cores} cores); waiting for it to go idle ...")
        time.sleep(10)
        load = load_average()
    return load


def _run_suite(name: str, ctx: BenchContext) -> SuiteResult:
    module = suite(name)
    started = time.perf_counter()
    with ctx.progress.suite(name, module.STEPS):
        try:
            result: SuiteResult = module.run(ctx)
        except Exception as exc:  # a broken suite is reported; the others still run
            result = SuiteResult(name, name, skipped=f"failed: {exc!r}")
            result.notes.append(traceback.format_exc())
    result.seconds = time.perf_counter() - started
    return result


def run_bench(args: BenchArgs, config: CacheConfig, out: TextIO | None = None) -> int:
    """Run the chosen suites against `config`'s tiers; print their tables; write JSON, plots and HTML to
    `args.out`. 0 when every suite ran (or was skipped for a stated reason), 1 when one failed."""
    out = out if out is not None else sys.stdout
    names = list(dict.fromkeys(args.suites)) or list(SUITE_NAMES)
    for name in names:
        suite(name)  # unknown names fail before anything runs
    unknown = set(args.compare) - {"lmcache"}
    if unknown:
        raise ConfigError(f"--compare {', '.join(sorted(unknown))}: only lmcache can be compared")
    lmcache = find_lmcache(args.lmcache_python) if "lmcache" in args.compare else None
    trace = Path(args.trace).expanduser() if args.trace else None
    if trace is not None and not trace.is_file():
        raise ConfigError(f"--trace {args.trace}: no such file")
    target = Path(args.out)
    target.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now()
    services = Services(config.tiers.remote.url, config.p2p.index_url)
    with Progress() as progress, tempfile.TemporaryDirectory(prefix="nencache-bench-") as scratch:
        cores = os.cpu_count() or 1
        load_before = wait_until_idle(args.wait_idle, progress, cores) if args.wait_idle else load_average()
        ctx = BenchContext(config, Scale.of(args.quick), Path(scratch), progress, services,
                           compare_lmcache="lmcache" in args.compare, lmcache_python=lmcache, trace=trace)
        if "lmcache" in args.compare and lmcache is None:
            ctx.notes.append("--compare lmcache: LMCache is not installed here (not importable, no .venv-lmcache, no "
                             "--lmcache-python); its columns are left empty")
        results: list[SuiteResult] = []
        try:
            for name in names:
                results.append(_run_suite(name, ctx))
        finally:
            services.close()
        load_after = load_average()
    machine = describe(Path(config.tiers.disk.path).expanduser() if config.tiers.disk.path else None)
    busy = [load for load in (load_before, load_after) if load is not None and load > BUSY_LOAD_PER_CORE * cores]
    if busy:
        ctx.notes.append(f"the machine was busy while measuring (1-minute load {max(busy):.1f} on {cores} cores): "
                         "other work shared the CPUs, so figures may be lower than this machine can do")
    report = Report(started=started.isoformat(timespec="seconds"), command=args.command, quick=args.quick, machine=machine,
                    config={k: v for k, v in config.as_dict().items() if k != "auth_token"},
                    load_before=load_before, load_after=load_after, notes=ctx.notes, suites=results)
    paths = write_report(report, target, out)
    print(f"\nreport: {paths.html}\nfigures: {paths.json}", file=out)
    return 1 if any(r.skipped and r.skipped.startswith("failed") for r in results) else 0


def parse_suites(values: Sequence[str]) -> list[str]:
    """Suite names from the command line (`tiers latency` or `tiers,latency`)."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]
