"""What a suite hands back: a table to show, every figure for the JSON file, targets checked, and a plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Cell = str | int | float | None


@dataclass(slots=True)
class TargetCheck:
    """One of NenCache's stated targets beside the figure measured for it.

    `met` is None when the figure could not be measured here (`measured` then says why).
    """

    name: str
    goal: str
    measured: str
    met: bool | None
    detail: str = ""

    @property
    def verdict(self) -> str:
        return {True: "met", False: "not met", None: "not measured"}[self.met]


@dataclass(slots=True)
class Series:
    """One line or one group of bars: `x` labels (or numbers) and `y` values (None: not measured)."""

    label: str
    x: list[Any]
    y: list[float | None]


@dataclass(slots=True)
class Plot:
    """A chart of a suite: grouped bars (`kind="bar"`) or lines over numeric x (`kind="line"`)."""

    title: str
    ylabel: str
    series: list[Series]
    kind: str = "bar"
    xlabel: str = ""
    log_y: bool = False
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label): targets drawn across


@dataclass(slots=True)
class Table:
    """A table of the report: column names and rows of cells."""

    columns: list[str]
    rows: list[list[Cell]]
    title: str = ""


@dataclass(slots=True)
class SuiteResult:
    """Everything one suite measured. `skipped` says why a suite did not run at all."""

    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[TargetCheck] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True, frozen=True)
class Summary:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            raise ValueError("no values to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def cell(self, digits: int = 3) -> str:
        """`median (low-high)` with `digits` significant digits."""
        return f"{self.median:.{digits}g} ({self.low:.{digits}g}-{self.high:.{digits}g})"


def percentile(samples: Sequence[float], q: float) -> float:
    """The `q` quantile (0-1) of `samples`, nearest rank."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def paired(ours: Sequence[float], theirs: Sequence[float]) -> Summary:
    """Median and range of the per-rep ratios `ours[i] / theirs[i]` (measured side by side in each rep)."""
    return Summary.of([a / b for a, b in zip(ours, theirs, strict=True) if b])


def fmt(value: float | None, digits: int = 3) -> str:
    """A figure for a table cell: 3 significant digits, '-' where not measured."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"
