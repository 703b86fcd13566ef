"""Writing benchmark figures into benchmarks/RESULTS.md: one section per benchmark part, replaced on rerun."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
_HEAD = "# Benchmark results\n\nEach section is written by the script named in it; rerun the command to refresh it.\n"


def machine() -> str:
    """One line describing this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(ours: Sequence[float], theirs: Sequence[float], unit: str = "x") -> str:
    """The median (and range) of per-rep ratios `ours[i] / theirs[i]`, as a table cell."""
    values = [a / b for a, b in zip(ours, theirs)]
    return f"{median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats get 3 significant decimals."""
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 1000 else (f"{v:.0f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, command: str | None = None) -> None:
    """Replace (or append) the section `name` of RESULTS.md with `body`, stamped with command, machine and date."""
    text = RESULTS.read_text() if RESULTS.exists() else _HEAD
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (
        f"<!-- section:{name} -->\n## {name}\n\n"
        f"- command: `{command or command_line()}`\n- machine: {machine()}\n- date: {stamp}\n\n"
        f"{body.strip()}\n<!-- end:{name} -->\n"
    )
    pattern = re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- end:{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
