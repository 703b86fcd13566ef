"""One benchmark script run on two source trees in turn, round by round: does a change move its ratios?

    python benchmarks/compare_trees.py --before 1c6d565 --rounds 5 -- server.py --reps 1 --no-lmcache

`--before` is a git revision of this repository (exported with `git archive`) or a directory holding
a checkout. Each round runs the script once on each tree (the order alternates round by round), each
tree with its own `src/` and its own copy of the script, in a child process; the copies write their
RESULTS.md into a scratch directory, not into this one. Every ratio cell of the Markdown tables the
script prints (a column whose header has "/", "ratio" or "speedup") is collected, and the comparison
is the median (and range) over rounds of the per-round after / before quotient of that cell: the two
sides of one round ran minutes apart on the same machine, so slow drifts of a shared machine's load
cancel out of it. The table is written to RESULTS.md under "compare trees: SCRIPT".
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a git revision of this repository, or a checkout's directory")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run of the script may take")
    parser.add_argument("script", help="a script in benchmarks/, e.g. server.py")
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
                got[side].append(run_once(sides[side], Path(tmp) / side, opts.script, args, opts.timeout))
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
    body = (f"`{opts.script} {' '.join(args)}` run {opts.rounds} times on each tree, the two in turn round by round "
            f"(order alternating); before: `{opts.before}`, after: this tree. Each cell: median (range) over rounds of "
            "the script's own ratio; after / before: median (range) of the per-round quotients (1.000 = unchanged; "
            "for a ratio where higher is better, below 1 is slower after). Load average (1 min) at the start and after "
            f"each round: {', '.join(f'{x:.1f}' for x in loads)} on {os.cpu_count()} cores.\n\n"
            + table(["row: ratio", "before", "after", "after / before"], rows))
    print(body)
    write_section(f"compare trees: {opts.script}", body, "python " + " ".join(
        ["benchmarks/compare_trees.py", "--before", opts.before, "--rounds", str(opts.rounds), "--", opts.script, *args]))


if __name__ == "__main__":
    main()
