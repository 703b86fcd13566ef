"""Live progress of a benchmark run (rich), on stderr; plain lines where stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class Progress:
    """One bar per suite, advanced step by step, with the step being measured as its description."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._bar: Any = None
        self._task: Any = None
        self._name = ""

    def __enter__(self) -> Progress:
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn

            self._bar = RichProgress(TextColumn("[bold]{task.fields[suite]:<8}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.description}"),
                                     console=Console(file=self.stream), transient=False)
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    @contextmanager
    def suite(self, name: str, steps: int) -> Iterator[None]:
        """A bar of `steps` steps for suite `name` (finished when the block ends)."""
        self._name = name
        started = time.perf_counter()
        if self._bar is not None:
            self._task = self._bar.add_task("starting", total=max(1, steps), suite=name)
        else:
            print(f"[{name}] starting ({steps} steps)", file=self.stream, flush=True)
        try:
            yield
        finally:
            if self._bar is not None and self._task is not None:
                self._bar.update(self._task, completed=max(1, steps), description="done")
            else:
                print(f"[{name}] done in {time.perf_counter() - started:.1f}s", file=self.stream, flush=True)
            self._task = None

    def step(self, description: str) -> None:
        """Say what is being measured now (the previous step is counted as done)."""
        if self._bar is not None and self._task is not None:
            task = self._bar.tasks[[t.id for t in self._bar.tasks].index(self._task)]
            if task.description != "starting":
                self._bar.advance(self._task)
            self._bar.update(self._task, description=description)
        else:
            print(f"[{self._name}] {description}", file=self.stream, flush=True)

    def note(self, message: str) -> None:
        """A line above the bars (a skipped part, a wait for the machine to go idle)."""
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            print(message, file=self.stream, flush=True)
