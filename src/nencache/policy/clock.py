"""`SimClock`: the trace's time, which the simulator and its logged policies read instead of the wall clock."""

from __future__ import annotations


class SimClock:
    """The trace's time, set by the simulator before each step."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now
