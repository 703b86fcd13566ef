"""PNG charts of the suites' `Plot`s (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from nencache.bench.results import Plot

COLORS = ("#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#c53030", "#718096")


def render(plot: Plot, path: Path) -> Path:
    """Draw `plot` into `path` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.2), dpi=100)
    try:
        if plot.kind == "line":
            for color, series in zip(COLORS, plot.series):
                points = [(x, y) for x, y in zip(series.x, series.y) if y is not None]
                if points:
                    axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color,
                              label=series.label)
        else:
            labels = list(dict.fromkeys(x for series in plot.series for x in series.x))
            width = 0.8 / max(1, len(plot.series))
            for i, (color, series) in enumerate(zip(COLORS, plot.series)):
                values = dict(zip(series.x, series.y))
                xs = [j + (i - (len(plot.series) - 1) / 2) * width for j in range(len(labels))]
                ys = [values.get(label) for label in labels]
                axes.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
                         color=color, label=series.label)
            axes.set_xticks(range(len(labels)))
            axes.set_xticklabels([str(label) for label in labels], fontsize=8)
        for value, label in plot.hlines:
            axes.axhline(value, color="#c53030", linestyle="--", linewidth=1)
            axes.annotate(label, (1.0, value), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                          fontsize=8, color="#c53030")
        if plot.log_y:
            axes.set_yscale("log")
        axes.set_title(plot.title)
        axes.set_ylabel(plot.ylabel)
        if plot.xlabel:
            axes.set_xlabel(plot.xlabel)
        axes.grid(axis="y", alpha=0.3)
        if len(plot.series) > 1:
            axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path
