"""One benchmark script run on two source trees in turn, round by round: does a change move its ratios?

    python benchmarks/compare_trees.py --before 1c6d565 --rounds 5 -- server.py --reps 1 --no-lmcache

    python benchmarks/compare_trees.py --before 6d68338 --rounds 9 -- bench:latency

`--before` is a git revision of this repository (exported with `git archive`) or a directory holding
a checkout. `bench:SUITE` runs `nencache bench SUITE` of each tree instead of a script, and compares
the numbers of its `bench.json` figures whose name ("figure: field") matches `--fields` (default: p50; a
figure that lists one number per repetition counts as their median). Each round runs the script once on
each tree (the order alternates round by round), each
tree with its own `src/` and its own copy of the script, in a child process; the copies write their
RESULTS.md into a scratch directory, not into this one. Every ratio cell of the Markdown tables the
script prints (a column whose header has "/", "ratio" or "speedup") is collected, and the comparison
is the median (and range) over rounds of the per-round after / before quotient of that cell: the two
sides of one round ran minutes apart on the same machine, so slow drifts of a shared machine's load
cancel out of it. The table is written to RESULTS.md under "compare trees: SCRIPT".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import median, table, write_section  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
RATIO_HEADER = re.compile(r" / |ratio|speedup", re.I)
MEASURE_HEADER = re.compile(r"\(|/|ratio|speedup|GB|p50|p99|us\b|µs|ms\b", re.I)
NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(%|x)?")
BENCH = "bench:"


def export(revision: str, into: Path) -> Path:
    """A checkout of `revision` (a directory, used as it is, or a git revision of this repository)."""
    if Path(revision).is_dir():
        return Path(revision).resolve()
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(HERE), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def ratio_cells(text: str) -> dict[str, float]:
    """Every ratio cell of the Markdown tables in `text`, keyed "row label: column"."""
    cells: dict[str, float] = {}
    headers: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            headers = None
            continue
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if headers is None:
            headers = parts
            continue
        if all(set(p) <= {"-", ":"} for p in parts):
            continue
        naming = 1
        while naming < len(headers) - 1 and not MEASURE_HEADER.search(headers[naming]):
            naming += 1  # leading columns that name the row (model, context, ...), not measure it
        label = " / ".join(parts[:naming])
        for header, cell in zip(headers[naming:], parts[naming:]):
            found = NUMBER.match(cell)
            if found and RATIO_HEADER.search(header):
                value = float(found.group(1)) / (100.0 if found.group(2) == "%" else 1.0)
                cells[f"{label}: {header}"] = value
    return cells


def run_once(tree: Path, scratch: Path, script: str, args: list[str], timeout: float) -> dict[str, float]:
    """The script of `tree`, run on `tree`'s package; its ratio cells."""
    bench = scratch / "benchmarks"
    if not bench.exists():
        shutil.copytree(tree / "benchmarks", bench)
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    done = subprocess.run([sys.executable, str(bench / script), *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed on {tree} (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return ratio_cells(done.stdout)


def bench_once(tree: Path, scratch: Path, suite: str, fields: re.Pattern[str], timeout: float) -> dict[str, float]:
    """`nencache bench SUITE` of `tree`, run on `tree`'s package; the numbers of its figures named by `fields`."""
    out = scratch / "bench-out"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    done = subprocess.run([sys.executable, "-m", "nencache.cli", "bench", suite, "--out", str(out)], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"nencache bench {suite} failed on {tree} (exit {done.returncode}):\n{done.stderr[-4000:]}")
    cells: dict[str, float] = {}
    for result in json.loads((out / "bench.json").read_text())["suites"]:
        for label, value in result["figures"].items():
            for field, number in (value.items() if isinstance(value, dict) else [("", value)]):
                name = f"{label}: {field}" if field else label
                if isinstance(number, list) and number and all(_is_number(x) for x in number):
                    number = statistics.median(number)  # one value per repetition (the disk suite): their median
                if _is_number(number) and fields.search(name):
                    cells[name] = float(number)
    return cells


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a git revision of this repository, or a checkout's directory")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run of the script may take")
    parser.add_argument("--fields", default="p50", help="with bench:SUITE, a regex of the figures to compare")
    parser.add_argument("script", help="a script in benchmarks/, e.g. server.py; or bench:SUITE")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    opts = parser.parse_args()
    args = [a for a in opts.args if a != "--"]
    with tempfile.TemporaryDirectory(prefix="nencache-compare-") as tmp:
        before = export(opts.before, Path(tmp) / "before-tree")
        sides = {"before": before, "after": HERE}
        got: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        loads = [os.getloadavg()[0]]
        for round_no in range(opts.rounds):
            order = ["before", "after"] if round_no % 2 == 0 else ["after", "before"]
            for side in order:
                started = time.monotonic()
                scratch = Path(tmp) / side
                if opts.script.startswith(BENCH):
                    scratch.mkdir(exist_ok=True)
                    got[side].append(bench_once(sides[side], scratch, opts.script[len(BENCH):],
                                                re.compile(opts.fields), opts.timeout))
                else:
                    got[side].append(run_once(sides[side], scratch, opts.script, args, opts.timeout))
                print(f"round {round_no + 1}/{opts.rounds} {side}: {time.monotonic() - started:.0f} s", flush=True)
            loads.append(os.getloadavg()[0])
    keys = [k for k in got["after"][0] if all(k in run for run in got["before"] + got["after"])]
    rows = []
    for key in keys:
        b = [run[key] for run in got["before"]]
        a = [run[key] for run in got["after"]]
        quotients = [x / y for x, y in zip(a, b) if y]
        rows.append([key, f"{median(b):.3g} ({min(b):.3g}-{max(b):.3g})", f"{median(a):.3g} ({min(a):.3g}-{max(a):.3g})",
                     f"{median(quotients):.3f} ({min(quotients):.3f}-{max(quotients):.3f})" if quotients else "-"])
    what = (f"`nencache bench {opts.script[len(BENCH):]}`, its figures matching `{opts.fields}`"
            if opts.script.startswith(BENCH) else f"`{opts.script} {' '.join(args)}`, the script's own ratios")
    body = (f"{what}: run {opts.rounds} times on each tree, the two in turn round by round "
            f"(order alternating); before: `{opts.before}`, after: this tree. Each cell: median (range) over rounds; "
            "after / before: median (range) of the per-round quotients (1.000 = unchanged; for a ratio where higher "
            "is better, below 1 is slower after; for a time, below 1 is faster after). Load average (1 min) at the "
            "start and after "
            f"each round: {', '.join(f'{x:.1f}' for x in loads)} on {os.cpu_count()} cores.\n\n"
            + table(["figure: field" if opts.script.startswith(BENCH) else "row: ratio", "before", "after",
                     "after / before"], rows))
    print(body)
    fields = ["--fields", opts.fields] if opts.script.startswith(BENCH) else []
    write_section(f"compare trees: {opts.script}", body, "python " + shlex.join(
        ["benchmarks/compare_trees.py", "--before", opts.before, "--rounds", str(opts.rounds), *fields, "--",
         opts.script, *args]))


if __name__ == "__main__":
    main()
