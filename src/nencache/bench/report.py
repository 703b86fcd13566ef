"""The report of a run: tables in the terminal, one JSON file with every figure, PNG plots, one HTML page.

The HTML page is self-contained (the plots are embedded), so it can be mailed or attached to an issue.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from nencache.bench.machine import one_line
from nencache.bench.plots import render
from nencache.bench.results import SuiteResult, TargetCheck

TEMPLATE = "report.html.j2"


@dataclass(slots=True)
class Report:
    """One run: when, how, where, and what every suite measured."""

    started: str
    command: str
    quick: bool
    machine: dict[str, Any]
    config: dict[str, Any]
    load_before: float | None
    load_after: float | None
    notes: list[str] = field(default_factory=list)
    suites: list[SuiteResult] = field(default_factory=list)

    @property
    def targets(self) -> list[tuple[str, TargetCheck]]:
        """Every target checked, with the suite that measured it."""
        return [(suite.name, target) for suite in self.suites for target in suite.targets]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = [{"suite": name, **asdict(target), "verdict": target.verdict}
                           for name, target in self.targets]
        return data


@dataclass(slots=True)
class Written:
    json: Path
    html: Path
    plots: list[Path]


def _clean(value: Any) -> Any:
    """JSON without NaN or infinity (both become null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def print_tables(report: Report, out: TextIO) -> None:
    """Each suite's tables and notes, then the targets, as rich tables on `out`."""
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console(file=out, width=max(120, Console(file=out).width), highlight=False)
    console.print(f"[bold]NenCache bench[/bold] on {one_line(report.machine)}")
    for suite in report.suites:
        console.rule(f"{suite.name}: {suite.title}")
        if suite.skipped:
            console.print(f"skipped: {suite.skipped.splitlines()[0]}")
            continue
        for table in suite.tables:
            shown = RichTable(*table.columns, title=table.title or None, show_lines=False)
            for row in table.rows:
                shown.add_row(*["-" if cell is None else str(cell) for cell in row])
            console.print(shown)
        for note in suite.notes:
            console.print(f"[dim]{note}[/dim]")
    if report.targets:
        console.rule("NenCache's targets")
        shown = RichTable("target", "goal", "measured", "verdict")
        for _, target in report.targets:
            color = {True: "green", False: "red", None: "yellow"}[target.met]
            shown.add_row(target.name, target.goal, target.measured, f"[{color}]{target.verdict}[/{color}]")
        console.print(shown)
    for note in report.notes:
        console.print(f"note: {note}")


def render_html(report: Report, images: dict[str, list[str]]) -> str:
    """The one-page report (`images`: per suite, its plots as PNG data URIs)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("nencache.bench", "templates"), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template(TEMPLATE).render(report=report, machine_line=one_line(report.machine), images=images,
                                             targets=report.targets)


def write_report(report: Report, directory: Path, out: TextIO) -> Written:
    """Print the tables to `out`; write bench.json, one PNG per plot and report.html into `directory`."""
    print_tables(report, out)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "bench.json"
    json_path.write_text(json.dumps(_clean(report.as_dict()), indent=1, default=str) + "\n")
    plots: list[Path] = []
    images: dict[str, list[str]] = {}
    for suite in report.suites:
        for number, plot in enumerate(suite.plots):
            path = render(plot, directory / f"{suite.name}{'-' + str(number + 1) if number else ''}.png")
            plots.append(path)
            images.setdefault(suite.name, []).append(
                "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"))
    html_path = directory / "report.html"
    html_path.write_text(render_html(report, images))
    return Written(json_path, html_path, plots)
