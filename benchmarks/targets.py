"""NenCache's targets measured on this machine: runs `nencache bench` and writes the "NenCache's targets"
section of benchmarks/RESULTS.md (each target with the figure measured and whether it is met).

    python benchmarks/targets.py [--quick] [--trace ../shared/traces/mooncake_conversation.jsonl] [--out DIR]
    python benchmarks/targets.py --from DIR/bench.json     # rewrite the section from an earlier run

LMCache's columns come from `.venv-lmcache` (benchmarks/setup_lmcache.sh); the report (HTML, plots,
JSON) stays in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command_line, write_section  # noqa: E402

from nencache.bench.command import BenchArgs, run_bench  # noqa: E402
from nencache.bench.markdown import report_markdown  # noqa: E402
from nencache.config_loader import load_config  # noqa: E402

SECTION = "NenCache's targets"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trace", help="request trace for the trace suite")
    parser.add_argument("--out", default="nencache-bench", help="directory for the report (default ./nencache-bench)")
    parser.add_argument("--from", dest="source", help="an earlier run's bench.json: write the section from it")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="minutes to wait for an idle machine")
    args = parser.parse_args()
    if args.source:
        source = Path(args.source)
        command = json.loads(source.read_text())["command"]
    else:
        command = command_line()
        code = run_bench(BenchArgs([], args.quick, args.out, ["lmcache"], None, args.trace, args.wait_idle,
                                   command), load_config().config)
        source = Path(args.out) / "bench.json"
        if code:
            print("a suite failed; see the report", file=sys.stderr)
    report = json.loads(source.read_text())
    body = ("Written by `benchmarks/targets.py` from one run of `nencache bench` (all suites, `--compare lmcache`); "
            "each target is shown as stated, with the figure measured here and whether it is met. The figures "
            "behind each verdict follow, suite by suite.\n\n" + report_markdown(report))
    write_section(SECTION, body, command)
    print(f"wrote the section {SECTION!r} of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
