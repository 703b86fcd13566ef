"""A run's report (its bench.json) as Markdown: NenCache's targets, then every suite's tables and notes."""

from __future__ import annotations

from typing import Any


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def targets_table(report: dict[str, Any]) -> str:
    """One row per target: the goal as stated, the figure measured, and whether it is met."""
    rows = [[t["name"], t["goal"], t["measured"] + (f" ({t['detail']})" if t.get("detail") else ""),
             f"**{t['verdict']}**", t["suite"]] for t in report["targets"]]
    return _table(["target", "goal", "measured", "verdict", "suite"], rows)


def suites_markdown(report: dict[str, Any]) -> str:
    """Each suite's tables and notes (tracebacks of failed suites left out)."""
    parts = []
    for suite in report["suites"]:
        parts.append(f"### {suite['name']}: {suite['title']}")
        if suite.get("skipped"):
            parts.append(f"Skipped: {suite['skipped']}")
            continue
        for table in suite["tables"]:
            if table.get("title"):
                parts.append(f"{table['title']}:")
            parts.append(_table(table["columns"], table["rows"]))
        parts += [note for note in suite["notes"] if not note.startswith("Traceback")]
    return "\n\n".join(parts)


def report_markdown(report: dict[str, Any]) -> str:
    """The whole report: targets first, then the suites' figures behind them."""
    head = [f"Machine load (1 minute): {report.get('load_before')} before, {report.get('load_after')} after."]
    head += [f"Note: {note}" for note in report.get("notes", [])]
    return "\n\n".join([targets_table(report), *head, suites_markdown(report)])
