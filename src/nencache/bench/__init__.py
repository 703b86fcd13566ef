"""`nencache bench`: NenCache's performance measured on this machine, against this machine's own limits.

Each suite (`nencache.bench.suites`) measures one thing against the tiers of the user's config and
against a reference that bounds it here (memcpy, `dd` with direct I/O, `redis-benchmark`, a raw
socket, LMCache where it is installed), interleaved rep by rep. The command prints live progress and
a table per suite, and writes one JSON file with every figure and the machine's description, PNG
plots and a one-page HTML report (`nencache.bench.report`). NenCache's stated targets are checked
against the figures (`nencache.bench.targets`): each is shown with what was measured, met or not.
"""

from __future__ import annotations

from nencache.bench.command import BenchArgs, run_bench
from nencache.bench.suites import SUITE_NAMES

__all__ = ["SUITE_NAMES", "BenchArgs", "run_bench"]
