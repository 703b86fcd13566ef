"""Quiet logging for failures that repeat: a broken tier or peer must not flood the log on every call.

`WarnOnce` logs the first warning of each topic (say `"tier:redis"`) and sends the repeats to debug;
`ThrottledWarning` logs at most one warning per interval, whatever its text. Both are thread-safe.
"""

from __future__ import annotations

import logging
import math
import threading
import time


class WarnOnce:
    """Logs one warning per topic; later messages of a topic go to debug."""

    __slots__ = ("_log", "_seen", "_lock")

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, topic: str, message: str, *args: object) -> bool:
        """Log `message` (%-style `args`); True when it was the topic's first, logged as a warning."""
        with self._lock:
            first = topic not in self._seen
            self._seen.add(topic)
        (self._log.warning if first else self._log.debug)(message, *args)
        return first

    def seen(self, topic: str) -> bool:
        """True once a warning of `topic` has been logged."""
        with self._lock:
            return topic in self._seen

    def forget(self, topic: str) -> None:
        """Warn again on the next message of `topic` (after the failure it reported was resolved)."""
        with self._lock:
            self._seen.discard(topic)


class ThrottledWarning:
    """Logs a warning at most once per `every` seconds; the ones in between go to debug."""

    __slots__ = ("_log", "_every", "_last", "_lock")

    def __init__(self, log: logging.Logger, every: float = 60.0) -> None:
        self._log, self._every = log, every
        self._last = -math.inf
        self._lock = threading.Lock()

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            loud = now - self._last >= self._every
            if loud:
                self._last = now
        (self._log.warning if loud else self._log.debug)(message, *args)
